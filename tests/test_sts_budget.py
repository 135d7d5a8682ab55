"""The STS rate budget: never more than it allows, pods waiting for first credentials before
refreshes, throttling answered by backing off — and no pod that holds valid credentials refused
meanwhile. Against moto (behind the recording front) where STS is involved."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
from prometheus_client import REGISTRY

from server.credentials import CredentialCache, CredentialsUnavailable
from server.identity import RoleIdentity
from server.sts_budget import Priority, StsBudget, Ticket
from tests.support.waiting import eventually

BASE = "arn:aws:iam::123456789012:role/"


async def granted_in_order(budget: StsBudget, tickets: list[tuple[str, Ticket]]) -> list[str]:
    order: list[str] = []

    async def one(name: str, ticket: Ticket) -> None:
        await budget.wait(ticket)
        order.append(name)

    tasks = []
    for name, ticket in tickets:
        tasks.append(asyncio.create_task(one(name, ticket)))
        await asyncio.sleep(0)  # queued in this order
    await asyncio.gather(*tasks)
    return order


async def test_first_fetches_go_before_refreshes_queued_earlier():
    budget = StsBudget(qps=200, burst=1)
    try:
        tickets = [(f"refresh-{n}", Ticket(Priority.REFRESH)) for n in range(4)]
        tickets += [(f"first-{n}", Ticket(Priority.FIRST)) for n in range(3)]
        order = await granted_in_order(budget, tickets)
    finally:
        await budget.close()
    # The burst token went to the first refresh; every first fetch then overtook the rest.
    assert order == ["refresh-0", "first-0", "first-1", "first-2", "refresh-1", "refresh-2",
                     "refresh-3"]  # fmt: skip


async def test_a_refresh_a_pod_comes_to_wait_for_is_promoted():
    budget = StsBudget(qps=100, burst=1)
    tickets = [(f"refresh-{n}", Ticket(Priority.REFRESH)) for n in range(4)]
    try:
        waiting = asyncio.create_task(granted_in_order(budget, tickets))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        budget.promote(tickets[3][1])
        order = await waiting
    finally:
        await budget.close()
    assert order.index("refresh-3") < order.index("refresh-2")


async def test_calls_never_exceed_the_burst_plus_the_rate():
    qps, burst = 100.0, 5
    budget = StsBudget(qps=qps, burst=burst)
    started = time.monotonic()
    grants: list[float] = []

    async def one() -> None:
        await budget.wait(Ticket(Priority.FIRST))
        grants.append(time.monotonic() - started)

    try:
        await asyncio.gather(*(one() for _ in range(40)))
    finally:
        await budget.close()
    for n, at in enumerate(grants, start=1):
        assert n <= burst + qps * at + 1e-6, (n, at)


async def test_a_throttling_answer_pauses_the_budget():
    budget = StsBudget(qps=1000, burst=10, throttle_pause=0.2)
    try:
        await budget.wait(Ticket(Priority.FIRST))
        budget.throttled()
        throttled_at = time.monotonic()
        await budget.wait(Ticket(Priority.FIRST))
        assert time.monotonic() - throttled_at >= 0.2
    finally:
        await budget.close()


# ---- the cache in front of moto, through the budget ----------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest_asyncio.fixture
async def make_cache(gateway) -> AsyncIterator[Callable[..., CredentialCache]]:
    made: list[tuple[CredentialCache, StsBudget]] = []

    def make(budget: StsBudget, clock: FakeClock, **options: Any) -> CredentialCache:
        cache = CredentialCache(
            gateway,
            refresh_before=timedelta(minutes=35),
            retry_initial=0.02,
            retry_max=0.05,
            clock=clock,
            max_sleep=0.01,
            budget=budget,
            **options,
        )
        made.append((cache, budget))
        return cache

    yield make
    for cache, budget in made:
        await cache.close()
        await budget.close()


def identities(prefix: str, count: int) -> list[RoleIdentity]:
    return [RoleIdentity(f"{BASE}{prefix}-{n}", f"podiam-{prefix}-{n}") for n in range(count)]


async def test_a_pod_waiting_for_first_credentials_goes_before_due_refreshes(make_cache, sts):
    clock = FakeClock()
    cache = make_cache(StsBudget(qps=8, burst=1), clock)
    held = identities("held", 6)
    for identity in held:
        cache.acquire(identity)
    await eventually(lambda: all(cache.peek(i) for i in held), timeout=10)
    sts.reset()

    clock.now += timedelta(minutes=26)  # every refresh is due
    await eventually(lambda: sts.assume_role_calls() >= 1)
    newcomer = RoleIdentity(BASE + "newcomer", "podiam-newcomer")
    assert (await cache.get(newcomer)).access_key_id
    order = [call.role_arn for call in sts.calls()]
    # At most the refreshes already let through went first; the newcomer overtook the rest.
    assert order.index(newcomer.role_arn) <= 2
    await eventually(lambda: sts.assume_role_calls() == len(held) + 1, timeout=10)


def throttled_metric() -> float:
    return REGISTRY.get_sample_value("podiam_sts_throttled_total") or 0.0


async def test_sts_throttling_fails_no_pod_that_holds_valid_credentials(make_cache, sts):
    clock = FakeClock()
    cache = make_cache(StsBudget(qps=50, burst=10, throttle_pause=0.05), clock)
    held = identities("steady", 5)
    for identity in held:
        cache.acquire(identity)
    await eventually(lambda: all(cache.peek(i) for i in held), timeout=10)
    before = {i: cache.peek(i) for i in held}
    throttles = throttled_metric()

    sts.set_failing(True, "Throttling")
    clock.now += timedelta(minutes=26)  # refreshes due, and STS says slow down
    await eventually(lambda: throttled_metric() > throttles, timeout=10)
    # Even below 30 minutes left, the old credentials are what there is: served, not refused.
    clock.now += timedelta(minutes=10)
    answers = await asyncio.gather(*(cache.get(i) for i in held for _ in range(20)))
    assert [a.access_key_id for a in answers] == [
        before[i].access_key_id for i in held for _ in range(20)
    ]

    sts.set_failing(False)
    await eventually(
        lambda: all(cache.peek(i).access_key_id != before[i].access_key_id for i in held),
        timeout=10,
    )


async def test_refreshes_are_spread_over_the_refresh_window(make_cache, sts):
    clock = FakeClock()
    cache = make_cache(StsBudget(qps=500, burst=100), clock, refresh_jitter=1.0,
                       rng=random.Random(7))  # fmt: skip
    spread = identities("spread", 20)
    for identity in spread:
        cache.acquire(identity)
    await eventually(lambda: all(cache.peek(i) for i in spread), timeout=10)
    first = {i: cache.peek(i).access_key_id for i in spread}
    expiry = min(cache.peek(i).expiration for i in spread)

    # Half way through the window (35 to 30 minutes before expiry): some refreshed, not all.
    clock.now = expiry - timedelta(minutes=32, seconds=30)
    await eventually(lambda: any(cache.peek(i).access_key_id != first[i] for i in spread))
    await asyncio.sleep(0.2)
    refreshed = sum(cache.peek(i).access_key_id != first[i] for i in spread)
    assert 0 < refreshed < len(spread)
    clock.now = expiry - timedelta(minutes=29)
    await eventually(lambda: all(cache.peek(i).access_key_id != first[i] for i in spread))


# ---- every attempt through the budget --------------------------------------------------------


def budget_grants() -> float:
    """Tokens the budget has handed out, first fetches and refreshes (one histogram sample per
    grant)."""
    sample = REGISTRY.get_sample_value
    return sum(
        sample("podiam_sts_budget_wait_seconds_count", {"priority": p.label}) or 0.0
        for p in Priority
    )


async def test_a_throttled_first_fetch_is_retried_through_the_budget_not_behind_it(make_cache, sts):
    cache = make_cache(StsBudget(qps=100, burst=10, throttle_pause=0.05), FakeClock())
    identity = RoleIdentity(BASE + "retried", "podiam-retried")
    grants = budget_grants()
    sts.fail_next(2, "Throttling")
    credentials = await cache.get(identity)
    assert credentials.access_key_id
    calls = sts.calls(identity.role_arn)
    # Two throttled attempts and the one that succeeded — no retry of botocore's own on top —
    # and each of the three took its token from the budget.
    assert [call.failed_with for call in calls] == ["Throttling", "Throttling", None]
    assert budget_grants() - grants == 3


async def test_sts_throttling_without_end_costs_three_attempts_per_call_each_granted(
    make_cache, sts
):
    cache = make_cache(StsBudget(qps=100, burst=10, throttle_pause=0.05), FakeClock())
    identity = RoleIdentity(BASE + "throttled", "podiam-throttled")
    grants = budget_grants()
    sts.set_failing(True, "Throttling")
    with pytest.raises(CredentialsUnavailable) as refused:
        await cache.get(identity)
    assert refused.value.cause.code == "Throttling"
    assert sts.assume_role_calls(identity.role_arn) == 3
    assert budget_grants() - grants == 3


async def test_access_denied_is_not_retried(make_cache, sts):
    cache = make_cache(StsBudget(qps=100, burst=10), FakeClock())
    identity = RoleIdentity(BASE + "denied", "podiam-denied")
    sts.fail_next(1, "AccessDenied")
    with pytest.raises(CredentialsUnavailable):
        await cache.get(identity)
    assert sts.assume_role_calls(identity.role_arn) == 1


async def test_sts_unavailable_for_a_moment_costs_the_pod_nothing(make_cache, sts):
    cache = make_cache(StsBudget(qps=100, burst=10), FakeClock())
    identity = RoleIdentity(BASE + "blip", "podiam-blip")
    sts.fail_next(1, "ServiceUnavailable")
    assert (await cache.get(identity)).access_key_id
    assert [c.failed_with for c in sts.calls(identity.role_arn)] == ["ServiceUnavailable", None]


async def test_throttling_answers_to_calls_already_in_flight_do_not_lengthen_the_pause():
    budget = StsBudget(qps=1000, burst=10, throttle_pause=0.2, throttle_pause_max=30)
    try:
        for _ in range(8):  # eight calls granted together, all answered Throttling
            budget.throttled()
        throttled_at = time.monotonic()
        await budget.wait(Ticket(Priority.FIRST))
        waited = time.monotonic() - throttled_at
        # One pause (0.2 s), not 0.2 s doubled seven times over.
        assert 0.2 <= waited < 5
    finally:
        await budget.close()
