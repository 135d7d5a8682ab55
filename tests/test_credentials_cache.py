"""The credentials cache in front of a real STS gateway talking to moto.

Refresh timing runs on an injected wall clock that tests move forward; the cache's background
tasks sleep in short real steps (`max_sleep`), so a refresh "35 minutes before expiry" happens
within milliseconds of the test moving the clock there. STS's own expirations stay real (moto
issues one-hour credentials from the real now), and the fake clock starts at the real now.

"Nothing happened" is never concluded from a pause: the clock notes which tasks read it, so a
test waits until every task watching it has read it several times since it moved (and so has
acted on the move, AssumeRole included), or until no task watches it any more.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
from prometheus_client import REGISTRY

from protos import kiam_pb2
from server.credentials import MIN_REMAINING, CredentialCache, CredentialsUnavailable
from server.credentials_proto import CredentialMessages
from server.fanout import NodeFanout
from server.identity import AwsCredentials, RoleIdentity
from server.sts import StsGateway
from tests.support.moto_sts import MotoSts
from tests.support.waiting import eventually

# `sts` (moto, reset per test) and `gateway` come from tests/support/fixtures.py.

ACCOUNT = "123456789012"
ORDERS = RoleIdentity(f"arn:aws:iam::{ACCOUNT}:role/orders-api", "default-orders-api")
BILLING = RoleIdentity(f"arn:aws:iam::{ACCOUNT}:role/billing", "billing-worker", "ext-7")


class FakeClock:
    """The cache's wall clock, moved by the test, noting which tasks read it since it moved."""

    # A refresher that wrongly acts on what it reads reads the clock at most three times before
    # it awaits the AssumeRole it started; its fourth read comes after moto has answered it.
    ACTED = 4

    def __init__(self) -> None:
        self._now = datetime.now(UTC)
        self._reads: Counter[asyncio.Task[Any]] = Counter()  # since seen_by began
        self._readers: set[asyncio.Task[Any]] = set()

    @property
    def now(self) -> datetime:
        return self._now

    @now.setter
    def now(self, moment: datetime) -> None:
        self._now = moment

    def __call__(self) -> datetime:
        task = asyncio.current_task()
        if task is not None:
            self._reads[task] += 1
            self._readers.add(task)
        return self._now

    def advance(self, delta: timedelta) -> None:
        self.now = self._now + delta

    def _watchers(self) -> list[asyncio.Task[Any]]:
        """Tasks other than the test's own that read the clock and are still running."""
        me = asyncio.current_task()
        return [task for task in self._readers if task is not me and not task.done()]

    async def seen_by(self, watchers: int) -> None:
        """Until ``watchers`` tasks (a refresher per acquired identity), and every other task
        watching the clock, have read it from now on and acted on what they read."""
        self._reads.clear()

        def seen() -> bool:
            counts = [self._reads[task] for task in self._watchers()]
            return len(counts) >= watchers and min(counts) >= self.ACTED

        await eventually(seen)

    async def unwatched(self) -> None:
        """Until no task watches the clock: nothing is left to act on a move."""
        await eventually(lambda: not self._watchers())


class Updates:
    """Records on_update calls."""

    def __init__(self) -> None:
        self.seen: list[tuple[RoleIdentity, AwsCredentials | None]] = []

    def __call__(self, identity: RoleIdentity, creds: AwsCredentials | None) -> None:
        self.seen.append((identity, creds))

    def of(self, identity: RoleIdentity) -> list[AwsCredentials | None]:
        return [creds for who, creds in self.seen if who == identity]


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def updates() -> Updates:
    return Updates()


@pytest_asyncio.fixture
async def make_cache(
    gateway: StsGateway, clock: FakeClock, updates: Updates
) -> AsyncIterator[Callable[..., CredentialCache]]:
    caches: list[CredentialCache] = []

    def make(**overrides: Any) -> CredentialCache:
        options: dict[str, Any] = {
            "refresh_before": timedelta(minutes=35),
            "on_update": updates,
            "retry_initial": 0.02,
            "retry_max": 0.05,
            "clock": clock,
            "max_sleep": 0.01,
        }
        options.update(overrides)
        cache = CredentialCache(gateway, **options)
        caches.append(cache)
        return cache

    yield make
    for cache in caches:
        await cache.close()


@pytest_asyncio.fixture
async def cache(make_cache: Callable[..., CredentialCache]) -> CredentialCache:
    return make_cache()


async def test_concurrent_gets_for_one_role_share_one_assume_role(
    cache: CredentialCache, sts: MotoSts
) -> None:
    misses = metric("podiam_credentials_cache_misses_total")

    results = await asyncio.gather(*(cache.get(ORDERS) for _ in range(200)))

    assert sts.assume_role_calls() == 1
    assert len({creds.access_key_id for creds in results}) == 1
    assert metric("podiam_credentials_cache_misses_total") == misses + 200


async def test_acquire_prefetches_before_anyone_asks(
    cache: CredentialCache, sts: MotoSts, updates: Updates
) -> None:
    cache.acquire(ORDERS)

    await eventually(lambda: cache.peek(ORDERS) is not None)
    assert sts.assume_role_calls(ORDERS.role_arn) == 1
    (pushed,) = updates.of(ORDERS)
    assert pushed == cache.peek(ORDERS)

    hits = metric("podiam_credentials_cache_hits_total")
    assert await cache.get(ORDERS) == pushed
    assert metric("podiam_credentials_cache_hits_total") == hits + 1
    assert sts.assume_role_calls() == 1


async def test_pods_sharing_an_identity_share_one_entry_until_the_last_leaves(
    cache: CredentialCache, sts: MotoSts, updates: Updates
) -> None:
    cache.acquire(ORDERS)
    cache.acquire(ORDERS)
    await eventually(lambda: cache.peek(ORDERS) is not None)

    cache.release(ORDERS)
    assert cache.peek(ORDERS) is not None and len(cache) == 1

    cache.release(ORDERS)
    assert len(cache) == 0
    assert cache.peek(ORDERS) is None
    assert updates.of(ORDERS)[-1] is None
    assert sts.assume_role_calls() == 1


async def test_release_stops_refreshing(
    cache: CredentialCache, sts: MotoSts, clock: FakeClock
) -> None:
    cache.acquire(ORDERS)
    await eventually(lambda: cache.peek(ORDERS) is not None)
    cache.release(ORDERS)

    clock.advance(timedelta(hours=2))
    await clock.unwatched()
    assert sts.assume_role_calls() == 1


async def test_extra_release_is_ignored(cache: CredentialCache, updates: Updates) -> None:
    cache.release(ORDERS)
    assert len(cache) == 0 and updates.seen == []


async def test_get_of_an_identity_nobody_acquired_is_answered_but_not_kept(
    cache: CredentialCache, sts: MotoSts, updates: Updates
) -> None:
    first = await cache.get(BILLING)
    assert len(cache) == 0 and cache.peek(BILLING) is None
    second = await cache.get(BILLING)

    assert first.access_key_id != second.access_key_id
    assert sts.assume_role_calls(BILLING.role_arn) == 2
    assert sts.calls(BILLING.role_arn)[0].external_id == "ext-7"
    assert updates.seen == []  # nobody to push them to


async def test_acquire_while_a_get_is_in_flight_keeps_that_fetch(
    cache: CredentialCache, sts: MotoSts, updates: Updates
) -> None:
    pending = asyncio.ensure_future(cache.get(ORDERS))
    await asyncio.sleep(0)  # the get has started its AssumeRole
    cache.acquire(ORDERS)

    creds = await pending
    await eventually(lambda: cache.peek(ORDERS) is not None)
    assert cache.peek(ORDERS) == creds
    assert updates.of(ORDERS) == [creds]
    assert sts.assume_role_calls() == 1


async def test_refresh_happens_once_per_period_and_is_pushed(
    cache: CredentialCache, sts: MotoSts, clock: FakeClock, updates: Updates
) -> None:
    cache.acquire(ORDERS)
    await eventually(lambda: len(updates.of(ORDERS)) == 1)
    first = updates.of(ORDERS)[0]
    assert first is not None

    # 40 minutes left: not yet due (refresh_before is 35 minutes).
    clock.now = first.expiration - timedelta(minutes=40)
    await clock.seen_by(watchers=1)
    assert sts.assume_role_calls() == 1

    # 34 minutes left: due, refreshed exactly once and pushed.
    clock.now = first.expiration - timedelta(minutes=34)
    await eventually(lambda: len(updates.of(ORDERS)) == 2)
    await clock.seen_by(watchers=1)
    assert sts.assume_role_calls() == 2
    second = updates.of(ORDERS)[1]
    assert second is not None and second.access_key_id != first.access_key_id
    assert cache.peek(ORDERS) == second
    assert await cache.get(ORDERS) == second
    assert sts.assume_role_calls() == 2


async def test_get_never_hands_out_credentials_under_30_minutes_when_sts_can_refresh(
    make_cache: Callable[..., CredentialCache], sts: MotoSts, clock: FakeClock
) -> None:
    cache = make_cache()
    cache.acquire(ORDERS)
    await eventually(lambda: cache.peek(ORDERS) is not None)
    old = cache.peek(ORDERS)
    assert old is not None

    clock.now = old.expiration - MIN_REMAINING + timedelta(seconds=1)  # 29m59s left
    fresh = await cache.get(ORDERS)

    assert fresh.access_key_id != old.access_key_id
    assert cache.peek(ORDERS) == fresh
    # The refresher, due at the same moment, shared that call or saw its result: one call.
    await clock.seen_by(watchers=1)
    assert sts.assume_role_calls() == 2


async def test_a_failing_on_update_does_not_stop_refreshing(
    make_cache: Callable[..., CredentialCache], sts: MotoSts, clock: FakeClock
) -> None:
    def broken(identity: RoleIdentity, creds: AwsCredentials | None) -> None:
        raise RuntimeError("consumer bug")

    cache = make_cache(on_update=broken)
    cache.acquire(ORDERS)
    await eventually(lambda: cache.peek(ORDERS) is not None)
    first = cache.peek(ORDERS)
    assert first is not None

    clock.now = first.expiration - timedelta(minutes=34)
    await eventually(lambda: sts.assume_role_calls() == 2)
    await eventually(lambda: cache.peek(ORDERS) not in (None, first))


async def test_sts_failing_during_refresh_keeps_old_credentials_served_and_retries(
    cache: CredentialCache, sts: MotoSts, clock: FakeClock, updates: Updates
) -> None:
    cache.acquire(ORDERS)
    await eventually(lambda: cache.peek(ORDERS) is not None)
    old = cache.peek(ORDERS)
    assert old is not None

    sts.set_failing(True, "AccessDenied")
    clock.now = old.expiration - timedelta(minutes=34)  # refresh due
    await eventually(lambda: sts.assume_role_calls(failed=True) >= 3)
    assert cache.peek(ORDERS) == old
    assert await cache.get(ORDERS) == old

    # Under 30 minutes left and STS still failing: the old, still valid ones are all there is.
    clock.now = old.expiration - timedelta(minutes=10)
    assert await cache.get(ORDERS) == old
    assert cache.peek(ORDERS) == old

    # Retries back off rather than spin: retry_max is 50ms, full jitter averages half that.
    failed = sts.assume_role_calls(failed=True)
    await asyncio.sleep(0.5)
    assert 1 <= sts.assume_role_calls(failed=True) - failed < 100
    assert None not in updates.of(ORDERS)

    # Recovery: new credentials are stored and pushed.
    sts.set_failing(False)
    await eventually(lambda: len(updates.of(ORDERS)) == 2)
    fresh = updates.of(ORDERS)[1]
    assert fresh is not None and fresh.access_key_id != old.access_key_id
    assert cache.peek(ORDERS) == fresh
    refreshes = REGISTRY.get_sample_value(
        "podiam_credentials_refreshes_total", {"outcome": "AccessDenied"}
    )
    assert refreshes is not None and refreshes >= 3


async def test_credentials_that_expire_while_sts_fails_are_withdrawn(
    cache: CredentialCache, sts: MotoSts, clock: FakeClock, updates: Updates
) -> None:
    cache.acquire(ORDERS)
    await eventually(lambda: cache.peek(ORDERS) is not None)
    old = cache.peek(ORDERS)
    assert old is not None

    sts.set_failing(True, "AccessDenied")
    clock.now = old.expiration + timedelta(seconds=1)

    await eventually(lambda: updates.of(ORDERS)[-1] is None)
    assert cache.peek(ORDERS) is None
    with pytest.raises(CredentialsUnavailable) as caught:
        await cache.get(ORDERS)
    assert caught.value.cause.code == "AccessDenied"
    assert ORDERS.role_arn in str(caught.value) and "\n" not in str(caught.value)
    assert len(cache) == 1  # still acquired: the refresher keeps trying


async def test_get_raises_credentials_unavailable_when_sts_fails_and_nothing_is_cached(
    cache: CredentialCache, sts: MotoSts
) -> None:
    sts.set_failing(True, "RegionDisabledException")
    results = await asyncio.gather(*(cache.get(BILLING) for _ in range(20)), return_exceptions=True)

    assert all(isinstance(result, CredentialsUnavailable) for result in results)
    assert {result.cause.code for result in results} == {"RegionDisabledException"}  # type: ignore[union-attr]
    # Counted for this role only: an earlier test's cancelled refresh may still be in its thread.
    assert sts.assume_role_calls(BILLING.role_arn) == 1
    assert len(cache) == 0


async def test_close_stops_every_background_task(
    cache: CredentialCache, sts: MotoSts, clock: FakeClock
) -> None:
    cache.acquire(ORDERS)
    cache.acquire(BILLING)
    await eventually(lambda: sts.assume_role_calls(failed=False) == 2)

    await cache.close()
    clock.advance(timedelta(hours=2))
    await clock.unwatched()

    assert len(cache) == 0
    assert sts.assume_role_calls() == 2


@pytest.mark.parametrize("minutes", [0, 29])
def test_refresh_before_must_leave_30_minutes(gateway: StsGateway, minutes: int) -> None:
    with pytest.raises(ValueError, match="refresh_before"):
        CredentialCache(gateway, refresh_before=timedelta(minutes=minutes))


# ---- wire messages: built once per set of credentials, forgotten with them ------------------


@pytest_asyncio.fixture
async def with_messages(make_cache: Callable[..., CredentialCache], updates: Updates):
    """A cache and its wire messages, joined as the server joins them: every on_update goes to
    the node fan-out, which replaces or drops the identity's message."""
    messages = CredentialMessages()
    fanout = NodeFanout(messages)

    def on_update(identity: RoleIdentity, creds: AwsCredentials | None) -> None:
        updates(identity, creds)
        fanout.credentials_changed(identity, creds)

    return make_cache(on_update=on_update), messages


async def _held(cache: CredentialCache, identity: RoleIdentity) -> AwsCredentials:
    """``identity`` acquired, once the cache holds its first credentials."""
    cache.acquire(identity)
    await eventually(lambda: cache.peek(identity) is not None)
    return cache.peek(identity)


async def test_wire_message_is_built_once_per_set_and_dropped_when_refreshed(
    with_messages, sts: MotoSts, clock: FakeClock, updates: Updates
) -> None:
    cache, messages = with_messages
    first = await _held(cache, ORDERS)
    message = messages.message(ORDERS, first)
    assert messages.message(ORDERS, first) is message and ORDERS in messages

    clock.now = first.expiration - timedelta(minutes=34)  # due for refresh
    await eventually(lambda: len(updates.of(ORDERS)) == 2)
    assert ORDERS not in messages  # the old secret is gone with the old credentials
    second = cache.peek(ORDERS)
    assert messages.message(ORDERS, second).access_key_id == second.access_key_id
    assert second.access_key_id != first.access_key_id


async def test_wire_message_is_dropped_when_credentials_expire_or_are_released(
    with_messages, sts: MotoSts, clock: FakeClock
) -> None:
    cache, messages = with_messages
    cache.acquire(ORDERS)
    cache.acquire(BILLING)
    await eventually(lambda: cache.peek(ORDERS) and cache.peek(BILLING))
    messages.message(ORDERS, cache.peek(ORDERS))
    messages.message(BILLING, cache.peek(BILLING))
    assert len(messages) == 2

    cache.release(BILLING)
    assert BILLING not in messages

    sts.set_failing(True, "Throttling")  # no refresh: the credentials run out
    clock.advance(timedelta(hours=2))
    await eventually(lambda: cache.peek(ORDERS) is None and ORDERS not in messages)
    assert len(messages) == 0


async def test_fresh_is_what_get_returns_at_once_and_nothing_with_30_minutes_or_less_left(
    cache: CredentialCache, sts: MotoSts, clock: FakeClock
) -> None:
    assert cache.fresh(ORDERS) is None  # nothing held: get would fetch
    cache.acquire(ORDERS)
    await eventually(lambda: cache.peek(ORDERS) is not None)
    held = cache.peek(ORDERS)
    assert cache.fresh(ORDERS) is held and await cache.get(ORDERS) is held

    sts.set_failing(True, "Throttling")  # the refresher cannot replace them meanwhile
    clock.now = held.expiration - MIN_REMAINING  # exactly 30 minutes left: get must decide
    assert cache.fresh(ORDERS) is None
    clock.now = held.expiration + timedelta(seconds=1)
    assert cache.fresh(ORDERS) is None


async def test_serialized_answer_is_the_message_once_per_set_and_forgotten_with_it(
    with_messages, sts: MotoSts, clock: FakeClock, updates: Updates
) -> None:
    cache, messages = with_messages
    first = await _held(cache, ORDERS)
    wire = messages.serialized(ORDERS, first)
    assert wire == messages.message(ORDERS, first).SerializeToString()
    assert messages.serialized(ORDERS, first) is wire  # serialized once

    clock.now = first.expiration - timedelta(minutes=34)  # due for refresh
    await eventually(lambda: len(updates.of(ORDERS)) == 2)
    second = cache.peek(ORDERS)
    assert second is not None and second.access_key_id != first.access_key_id
    again = kiam_pb2.Credentials.FromString(messages.serialized(ORDERS, second))
    assert again.access_key_id == second.access_key_id
    # Asked for the old set by name, it is built afresh, never taken for the held one.
    assert messages.serialized(ORDERS, first) == wire and ORDERS in messages
    assert messages.serialized(ORDERS, first) is not wire

    sts.set_failing(True, "Throttling")  # no refresh: the credentials run out
    clock.advance(timedelta(hours=2))
    await eventually(lambda: cache.peek(ORDERS) is None and ORDERS not in messages)
    assert len(messages) == 0


async def test_credentials_fetched_for_nobody_are_not_kept_as_messages(
    with_messages, sts: MotoSts
) -> None:
    cache, messages = with_messages
    creds = await cache.get(BILLING)  # nobody acquired BILLING: handed out, not kept
    assert messages.message(BILLING, creds).access_key_id == creds.access_key_id
    assert BILLING not in messages and len(cache) == 0
