"""Bounded waiting for asynchronous tests: poll a condition instead of sleeping a guess."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable


async def eventually(
    condition: Callable[[], object],
    timeout: float = 5,  # noqa: ASYNC109 - a polling deadline, as the tests read best
    interval: float = 0.01,
) -> None:
    """Return once ``condition()`` is truthy (it may be a coroutine function); fail the test
    if it is still falsy after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() >= deadline:
            name = getattr(condition, "__name__", repr(condition))
            raise AssertionError(f"condition {name} still false after {timeout}s")
        await asyncio.sleep(interval)
