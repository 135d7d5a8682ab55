"""What podiam-server and podiam-agent do alike as processes: log as configured, run until
SIGTERM or SIGINT, shut down gracefully, and report a start-up problem as one line and exit 1
(``flags.CANNOT_START``, the code bad flags exit with too).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Protocol

from runtime import logs
from runtime.flags import CANNOT_START


class StartupError(Exception):
    """A configuration or environment problem, reported as one line before exiting."""


class Service(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


async def run_until_signalled(service: Service, *, log: logging.Logger) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    try:
        await service.start()
        await stopping.wait()
        log.info("shutting down")
    finally:
        await service.stop()


def main(
    config,
    make_service: Callable[[object], Service],
    *,
    name: str,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
) -> int:
    """Run ``make_service(config)`` as the process ``name``, on an event loop from
    ``loop_factory`` (asyncio's default without one); the exit code to return."""
    logs.configure(config.log_level, json_log=config.json_log)
    log = logging.getLogger(name)

    async def run() -> None:
        await run_until_signalled(make_service(config), log=log)

    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(run())
    except StartupError as error:
        # One line, whatever the cause's own formatting (YAML errors span several).
        log.error("cannot start: %s", " ".join(str(error).split()))
        return CANNOT_START
    except KeyboardInterrupt:
        return 130
    return 0
