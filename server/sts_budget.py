"""The STS rate budget: a token bucket in front of AssumeRole, with pods first.

STS limits AssumeRole per account (users report about 600 requests per second, shared by every
caller in the account). A server that meets 20,000 new identities at once, or 10,000 refreshes
falling due together, must not spend that alone, and must not make a pod that waits for its
first credentials queue behind refreshes of credentials that are still valid for half an hour.

So every AssumeRole the credentials cache makes first takes a token (``--sts-qps`` per second,
up to ``--sts-burst`` saved up). Waiters are served by priority, then in arrival order:

- ``FIRST``: nothing valid is held for the identity — a pod is waiting for it, or is about to
  (the prefetch when a pod appears, made before the pod asks: its container starts within
  seconds, and its SDK gives the metadata service about one second).
- ``REFRESH``: credentials are held and still valid; renewing them can wait.

A waiting refresh that a pod comes to need (its credentials ran low meanwhile) is promoted.
When STS answers with throttling, the bucket stops handing out tokens for a while (doubling
while STS keeps throttling), so that one server slows down instead of retrying into the limit.

What would make this unnecessary: STS limits per caller rather than per account.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import time
from collections.abc import Callable

from server.metrics import STS_BUDGET_QUEUE, STS_BUDGET_WAIT_SECONDS, STS_THROTTLED

DEFAULT_QPS = 50.0
DEFAULT_BURST = 100


class Priority(enum.IntEnum):
    FIRST = 0
    REFRESH = 1

    @property
    def label(self) -> str:
        return self.name.lower()


class Ticket:
    """One AssumeRole's place in the budget's queue."""

    __slots__ = ("future", "priority", "queued_at")

    def __init__(self, priority: Priority) -> None:
        self.priority = priority
        self.future: asyncio.Future[None] | None = None
        self.queued_at = 0.0


class StsBudget:
    def __init__(
        self,
        *,
        qps: float = DEFAULT_QPS,
        burst: int = DEFAULT_BURST,
        throttle_pause: float = 1.0,
        throttle_pause_max: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if qps <= 0 or burst < 1:
            raise ValueError("need qps > 0 and burst >= 1")
        self.qps = qps
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._updated = clock()
        self._queues: dict[Priority, collections.deque[Ticket]] = {
            priority: collections.deque() for priority in Priority
        }
        self._dispatcher: asyncio.Task[None] | None = None
        self._kick = asyncio.Event()
        self._pause_initial = throttle_pause
        self._pause_max = throttle_pause_max
        self._pause = throttle_pause
        self._paused_until = 0.0

    # -- taking a token -----------------------------------------------------------------------

    async def wait(self, ticket: Ticket) -> None:
        """Return once ``ticket`` may call STS."""
        if self._take_now(ticket.priority):
            STS_BUDGET_WAIT_SECONDS.labels(priority=ticket.priority.label).observe(0.0)
            return
        ticket.future = asyncio.get_running_loop().create_future()
        ticket.queued_at = self._clock()
        self._queues[ticket.priority].append(ticket)
        self._gauge()
        self._ensure_dispatcher()
        try:
            await ticket.future
        finally:
            if not ticket.future.done() or ticket.future.cancelled():
                self._drop(ticket)

    def promote(self, ticket: Ticket) -> None:
        """A pod now waits for ``ticket``'s call: let it go before every refresh."""
        if ticket.priority is Priority.FIRST:
            return
        queued = ticket.future is not None and not ticket.future.done()
        if queued:
            self._queues[ticket.priority].remove(ticket)
            self._queues[Priority.FIRST].append(ticket)
        ticket.priority = Priority.FIRST
        self._gauge()
        self._kick.set()

    def queued(self, priority: Priority) -> int:
        return len(self._queues[priority])

    # -- what STS said ------------------------------------------------------------------------

    def throttled(self) -> None:
        """STS answered Throttling (or alike): hand out no tokens for a while. Answers that
        arrive while paused are to attempts made before the pause: they say nothing new, and
        do not lengthen it (eight calls in flight would otherwise double it eight times)."""
        STS_THROTTLED.inc()
        now = self._clock()
        if now < self._paused_until:
            return
        self._paused_until = now + self._pause
        self._pause = min(self._pause * 2, self._pause_max)
        self._tokens = 0.0
        self._updated = now

    def succeeded(self) -> None:
        self._pause = self._pause_initial

    # -- the bucket ---------------------------------------------------------------------------

    def _refill(self, now: float) -> None:
        if now < self._paused_until:
            self._updated = now
            return
        start = max(self._updated, self._paused_until)
        self._tokens = min(self.burst, self._tokens + (now - start) * self.qps)
        self._updated = now

    def _take_now(self, priority: Priority) -> bool:
        # Never overtake a waiter of the same or a higher priority.
        if any(self._queues[p] for p in Priority if p <= priority):
            return False
        now = self._clock()
        self._refill(now)
        if now < self._paused_until or self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def _next(self) -> Ticket | None:
        for priority in Priority:
            queue = self._queues[priority]
            while queue:
                ticket = queue[0]
                if ticket.future is not None and not ticket.future.done():
                    return ticket
                queue.popleft()
        return None

    def _ensure_dispatcher(self) -> None:
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch())

    async def _dispatch(self) -> None:
        while (ticket := self._next()) is not None:
            now = self._clock()
            self._refill(now)
            if now < self._paused_until:
                delay = self._paused_until - now
            elif self._tokens >= 1:
                self._tokens -= 1
                self._queues[ticket.priority].popleft()
                self._gauge()
                STS_BUDGET_WAIT_SECONDS.labels(priority=ticket.priority.label).observe(
                    now - ticket.queued_at
                )
                assert ticket.future is not None
                ticket.future.set_result(None)
                continue
            else:
                delay = (1 - self._tokens) / self.qps
            self._kick.clear()
            try:
                # A promotion or a throttling answer changes what comes next: re-look.
                await asyncio.wait_for(self._kick.wait(), timeout=delay)
            except TimeoutError:
                pass

    def _drop(self, ticket: Ticket) -> None:
        try:
            self._queues[ticket.priority].remove(ticket)
        except ValueError:
            pass
        self._gauge()

    def _gauge(self) -> None:
        for priority, queue in self._queues.items():
            STS_BUDGET_QUEUE.labels(priority=priority.label).set(len(queue))

    async def close(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        for queue in self._queues.values():
            for ticket in queue:
                if ticket.future is not None and not ticket.future.done():
                    ticket.future.cancel()
            queue.clear()
