"""The credentials cache: STS is called once per role identity per refresh period, however many
pods share the identity and however many of them ask at once.

Each identity that pods use (`acquire`) has one background task that fetches credentials as soon
as the first pod appears, before anyone asks, then sleeps until `refresh_before` is left of
their lifetime, refreshes, and repeats. New credentials are announced through `on_update`, so the
server can push them to agents, and withdrawn (`on_update(identity, None)`) when the last pod
goes away or when they expire while STS keeps failing.

`get` never hands out credentials with less than `MIN_REMAINING` left while fresher ones can be
had: it waits for a fetch instead, and only when STS fails does it fall back to old credentials
that have not expired (and while the refresher is backing off after a failure, `get` serves
those without calling STS itself, so an outage does not multiply the load on STS).
Concurrent callers share one fetch (an asyncio task awaited through `asyncio.shield`, so a
caller giving up cannot cancel it for the others).

`get` for an identity nobody acquired (the server normally acquires every identity a pod uses,
so this is a race with the pod watch) still works: it fetches — sharing the fetch with any other
caller — and hands the credentials out *without keeping them*. Nothing would refresh them, and
no agent needs them pushed; if the identity is acquired while that fetch is in flight, the entry
is kept and the fetch becomes its first one.

Every attempt at AssumeRole first waits for the STS rate budget (server/sts_budget.py) when there
is one. botocore makes one attempt per call; the retries on throttling or a transient failure
are made here (`sts_attempts`, jittered backoff), each through the budget again, so STS never
sees an attempt the budget did not grant. Calls for an identity with nothing valid held (a
`get`, or the first fetch when a pod appears) go before refreshes, and a refresh a pod comes to
wait for is promoted. A `get` that holds old, still valid credentials waits for fresher ones
only briefly (`STALE_WAIT`), then serves the old ones: a queue at the budget must not outlast
the SDK's one second. Refreshes are spread with jitter over the first `refresh_jitter` of the
window between `refresh_before` and `MIN_REMAINING`, so that identities fetched together do not
refresh together, and the rest of the window is slack for the budget's queue and for retries.

Scheduling reads the wall clock through `clock` and sleeps in steps of at most `max_sleep`
seconds, re-reading the clock after each: a suspended VM or a stepped clock cannot make a refresh
late by more than one step, and tests move an injected clock instead of waiting minutes.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from server.identity import MIN_REMAINING, AwsCredentials, RoleIdentity, format_aws_time
from server.metrics import CACHE_HITS, CACHE_MISSES, CACHE_REFRESHES, CACHE_SIZE
from server.sts import StsError, StsGateway
from server.sts_budget import Priority, StsBudget, Ticket

log = logging.getLogger(__name__)

DEFAULT_REFRESH_BEFORE = timedelta(minutes=35)
# However short-lived STS credentials turn out to be, refresh an identity at most this often.
MIN_REFRESH_INTERVAL = timedelta(minutes=1)
# How long a get() holding old but valid credentials waits for fresher ones before serving them.
STALE_WAIT = 0.25
DEFAULT_REFRESH_JITTER = 0.5
# Attempts per AssumeRole while STS throttles or fails transiently (botocore's standard mode made
# three), and the base of the full-jitter backoff between them; the budget's pause comes on top
# when STS throttles.
DEFAULT_STS_ATTEMPTS = 3
_ATTEMPT_BACKOFF = 0.1

_LONG_AGO = datetime.min.replace(tzinfo=UTC)
T = TypeVar("T")
OnUpdate = Callable[[RoleIdentity, AwsCredentials | None], None]


class CredentialsUnavailable(Exception):
    """No usable credentials for an identity: STS failed and nothing still valid is cached."""

    def __init__(self, identity: RoleIdentity, cause: StsError) -> None:
        self.identity = identity
        self.cause = cause
        super().__init__(f"no credentials for {identity.role_arn}: STS said {cause.code}")


@dataclass(slots=True, eq=False)
class _Entry:
    identity: RoleIdentity
    refcount: int = 0
    credentials: AwsCredentials | None = None
    # The one AssumeRole in flight for this identity, shared by everyone who needs it.
    inflight: asyncio.Task[AwsCredentials] | None = None
    # That call's place in the STS budget's queue, while it waits there.
    ticket: Ticket | None = None
    # The background refresh task, while the identity is acquired.
    refresher: asyncio.Task[None] | None = None
    # While STS fails and old credentials are still valid, get() serves them without calling
    # STS again until this loop time (the refresher's next retry).
    retry_at: float = 0.0
    # When the refresher renews the credentials (on `clock`), set whenever new ones are stored.
    refresh_at: datetime = _LONG_AGO
    # The last AssumeRole that failed and the last that succeeded (on `clock`), for explain.
    last_error: StsError | None = None
    last_error_at: datetime | None = None
    last_success_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class IdentityState:
    """What the cache holds for one identity, as `podiam-server explain` reports it."""

    pods: int  # pods holding the identity (0: fetched for a get() alone)
    credentials: AwsCredentials | None  # unexpired credentials, if any
    refresh_at: datetime | None  # when the refresher renews them
    fetching: bool  # an AssumeRole is in flight or queued at the rate budget
    last_error: StsError | None
    last_error_at: datetime | None
    last_success_at: datetime | None


class CredentialCache:
    def __init__(
        self,
        gateway: StsGateway,
        *,
        refresh_before: timedelta = DEFAULT_REFRESH_BEFORE,
        on_update: OnUpdate | None = None,
        retry_initial: float = 1.0,
        retry_max: float = 60.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        max_sleep: float = 10.0,
        budget: StsBudget | None = None,
        refresh_jitter: float = 0.0,
        rng: random.Random | None = None,
        sts_attempts: int = DEFAULT_STS_ATTEMPTS,
    ) -> None:
        if refresh_before < MIN_REMAINING:
            raise ValueError(
                f"refresh_before ({refresh_before}) must be at least {MIN_REMAINING}: credentials "
                f"are handed out only while more than {MIN_REMAINING} of their lifetime is left"
            )
        if not 0 < retry_initial <= retry_max:
            raise ValueError("need 0 < retry_initial <= retry_max")
        if max_sleep <= 0:
            raise ValueError("max_sleep must be positive")
        if sts_attempts < 1:
            raise ValueError("sts_attempts must be at least 1")
        self._sts_attempts = sts_attempts
        if not 0 <= refresh_jitter <= 1:
            raise ValueError("refresh_jitter is a fraction of the refresh window, 0 to 1")
        self._budget = budget
        self._jitter = (refresh_before - MIN_REMAINING).total_seconds() * refresh_jitter
        self._rng = rng or random.Random()
        self._gateway = gateway
        self._refresh_before = refresh_before
        self._on_update = on_update
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._clock = clock
        self._max_sleep = max_sleep
        self._entries: dict[RoleIdentity, _Entry] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- the public surface -------------------------------------------------------------------

    def acquire(self, identity: RoleIdentity) -> None:
        entry = self._entries.get(identity)
        if entry is None:
            entry = self._entries[identity] = _Entry(identity)
            CACHE_SIZE.set(len(self._entries))
        entry.refcount += 1
        if entry.refresher is None:
            entry.refresher = self._spawn(self._refresh_forever(entry))

    def release(self, identity: RoleIdentity) -> None:
        entry = self._entries.get(identity)
        if entry is None or entry.refcount <= 0:
            log.warning("release of %s, which is not acquired; ignored", identity.role_arn)
            return
        entry.refcount -= 1
        if entry.refcount:
            return
        del self._entries[identity]
        CACHE_SIZE.set(len(self._entries))
        if entry.refresher is not None:
            entry.refresher.cancel()
            entry.refresher = None
        # An AssumeRole in flight runs to its end for whoever awaits it, but is not stored.
        entry.credentials = None
        self._announce(entry, None)

    def fresh(self, identity: RoleIdentity) -> AwsCredentials | None:
        """What ``get`` returns at once, without awaiting anything: the held credentials while
        more than ``MIN_REMAINING`` of their lifetime is left; None when ``get`` would have to
        fetch or decide (nothing held, or too little left). The unary RPC's fast path."""
        entry = self._entries.get(identity)
        if entry is None:
            return None
        creds = entry.credentials
        if creds is None or creds.expiration - self._clock() <= MIN_REMAINING:
            return None
        CACHE_HITS.inc()
        return creds

    async def get(self, identity: RoleIdentity) -> AwsCredentials:
        creds = self.fresh(identity)
        if creds is not None:
            return creds
        entry = self._entries.get(identity)
        if entry is None:
            entry = self._entries[identity] = _Entry(identity)
            CACHE_SIZE.set(len(self._entries))
        old = self._valid(entry)
        if old is not None and asyncio.get_running_loop().time() < entry.retry_at:
            # STS is failing and the refresher will retry soon: don't add to the load.
            CACHE_HITS.inc()
            return old
        CACHE_MISSES.inc()
        try:
            fetch = asyncio.shield(self._fetch(entry, Priority.FIRST))
            if old is None:
                return await fetch
            try:
                return await asyncio.wait_for(fetch, STALE_WAIT)
            except TimeoutError:
                CACHE_HITS.inc()
                return old
        except StsError as exc:
            old = self._valid(entry)
            if old is not None:
                log.info(
                    "serving %s credentials expiring %s: STS said %s",
                    identity.role_arn,
                    format_aws_time(old.expiration),
                    exc.code,
                )
                return old
            raise CredentialsUnavailable(identity, exc) from exc

    def peek(self, identity: RoleIdentity) -> AwsCredentials | None:
        entry = self._entries.get(identity)
        if entry is None:
            return None
        return self._valid(entry)

    def state(self, identity: RoleIdentity) -> IdentityState | None:
        """What is held for ``identity``, or None when nothing is (read-only)."""
        entry = self._entries.get(identity)
        if entry is None:
            return None
        credentials = self._valid(entry)
        return IdentityState(
            pods=entry.refcount,
            credentials=credentials,
            refresh_at=entry.refresh_at if credentials is not None else None,
            fetching=entry.inflight is not None,
            last_error=entry.last_error,
            last_error_at=entry.last_error_at,
            last_success_at=entry.last_success_at,
        )

    def __len__(self) -> int:
        return len(self._entries)

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._entries.clear()
        CACHE_SIZE.set(0)

    # -- fetching -----------------------------------------------------------------------------

    def _fetch(self, entry: _Entry, priority: Priority) -> asyncio.Task[AwsCredentials]:
        """The AssumeRole in flight for this entry, started if there is none (and moved ahead
        at the budget when it now has a pod waiting)."""
        if entry.inflight is None:
            entry.inflight = self._spawn(self._assume_role(entry, priority))
        elif priority is Priority.FIRST and entry.ticket is not None and self._budget:
            self._budget.promote(entry.ticket)
        return entry.inflight

    async def _assume_role(self, entry: _Entry, priority: Priority) -> AwsCredentials:
        try:
            credentials = await self._attempts(entry, priority)
        finally:
            entry.ticket = None
            entry.inflight = None
            if entry.refcount == 0 and self._entries.get(entry.identity) is entry:
                # Fetched for a get() on an identity nobody acquired: hand out, don't keep.
                del self._entries[entry.identity]
                CACHE_SIZE.set(len(self._entries))
        if entry.refcount > 0 and self._entries.get(entry.identity) is entry:
            entry.credentials = credentials
            entry.retry_at = 0.0
            # However short-lived the credentials, never refresh in a tight loop.
            jitter = timedelta(seconds=self._rng.uniform(0, self._jitter))
            entry.refresh_at = max(
                credentials.expiration - self._refresh_before + jitter,
                self._clock() + MIN_REFRESH_INTERVAL,
            )
            self._announce(entry, credentials)
        return credentials

    async def _attempts(self, entry: _Entry, priority: Priority) -> AwsCredentials:
        """One AssumeRole, tried up to ``sts_attempts`` times while STS answers with throttling
        or a transient failure. Each attempt takes its own token from the budget (botocore makes
        one attempt per call, server/sts.py), so STS never sees more than the budget allows,
        and a throttling answer pauses the budget for every identity, not just this one."""
        for attempt in range(1, self._sts_attempts + 1):
            if self._budget is not None:
                entry.ticket = Ticket(priority)
                await self._budget.wait(entry.ticket)
                priority = entry.ticket.priority  # promoted while it waited, perhaps
                entry.ticket = None
            try:
                credentials = await self._gateway.assume_role(entry.identity)
            except StsError as exc:
                entry.last_error, entry.last_error_at = exc, self._clock()
                if exc.throttled and self._budget is not None:
                    self._budget.throttled()
                if not exc.retryable or attempt == self._sts_attempts:
                    raise
                # Full jitter, so identities that failed together do not come back together.
                await asyncio.sleep(self._rng.uniform(0, _ATTEMPT_BACKOFF * 2 ** (attempt - 1)))
                continue
            entry.last_success_at = self._clock()
            if self._budget is not None:
                self._budget.succeeded()
            return credentials
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _valid(self, entry: _Entry) -> AwsCredentials | None:
        """The entry's credentials if they have not expired."""
        credentials = entry.credentials
        if credentials is not None and credentials.seconds_left(self._clock()) > 0:
            return credentials
        return None

    # -- the refresher ------------------------------------------------------------------------

    async def _refresh_forever(self, entry: _Entry) -> None:
        backoff = self._retry_initial
        while True:
            self._withdraw_if_expired(entry)
            if entry.credentials is not None and entry.refresh_at > self._clock():
                await self._sleep_until_refresh(entry)
                continue
            # Nothing valid held (the first fetch, or after expiry): a pod waits or soon will.
            priority = Priority.FIRST if self._valid(entry) is None else Priority.REFRESH
            try:
                await asyncio.shield(self._fetch(entry, priority))
            except StsError as exc:
                CACHE_REFRESHES.labels(outcome=exc.code).inc()
                self._withdraw_if_expired(entry)
                # Exponential backoff with full jitter; wake up at expiry to withdraw.
                delay = random.uniform(0, backoff)
                backoff = min(backoff * 2, self._retry_max)
                old = self._valid(entry)
                if old is not None:
                    delay = min(delay, old.seconds_left(self._clock()))
                entry.retry_at = asyncio.get_running_loop().time() + delay
                log.warning(
                    "refresh of %s failed (%s); retrying in %.1fs%s",
                    entry.identity.role_arn,
                    exc.code,
                    delay,
                    f", serving credentials expiring {format_aws_time(old.expiration)}"
                    if old
                    else "",
                )
                await asyncio.sleep(delay)
                continue
            CACHE_REFRESHES.labels(outcome="success").inc()
            backoff = self._retry_initial

    async def _sleep_until_refresh(self, entry: _Entry) -> None:
        # Deliberately polls: the deadline is on the wall clock (`clock`), which asyncio's
        # monotonic timers do not follow across suspends, steps, or an injected test clock. It is
        # re-read each step, so a refresh made meanwhile by get() pushes the deadline on.
        while entry.credentials is not None:
            left = (entry.refresh_at - self._clock()).total_seconds()
            if left <= 0:
                return
            await asyncio.sleep(min(left, self._max_sleep))

    def _withdraw_if_expired(self, entry: _Entry) -> None:
        if entry.credentials is not None and self._valid(entry) is None:
            log.warning(
                "credentials for %s expired while STS was failing; withdrawn",
                entry.identity.role_arn,
            )
            entry.credentials = None
            self._announce(entry, None)

    # -- plumbing -----------------------------------------------------------------------------

    def _announce(self, entry: _Entry, credentials: AwsCredentials | None) -> None:
        if self._on_update is None:
            return
        try:
            self._on_update(entry.identity, credentials)
        except Exception:
            log.exception("on_update for %s failed", entry.identity.role_arn)

    def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._forget)
        return task

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        # Retrieve the exception, so asyncio does not report it as lost. StsErrors reach their
        # callers; anything else is a bug that killed a task and must be seen.
        error = task.exception()
        if error is not None and not isinstance(error, StsError):
            log.error("credentials task failed", exc_info=error)
