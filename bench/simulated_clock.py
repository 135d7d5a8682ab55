"""The real credentials cache on a simulated clock, for the sections whose question is about
credential lifetimes over an hour or a 30-minute STS outage (bench/sts_economy.py,
bench/sts_budget.py, bench/fault_sts_outage.py): too long to wait for, so the cache's wall
clock is injected and moved on, while every AssumeRole still goes to moto through the real
StsGateway."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, NamedTuple

from server.credentials import CredentialCache
from server.sts import StsGateway
from server.sts_budget import StsBudget
from tests.support.moto_sts import MotoSts, fake_session


class Clock:
    """Now, as the cache sees it: starts at the real now, moves only when ``now`` is set."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


class RetimedGateway:
    """The real gateway (real STS calls to moto), with each answer's lifetime moved onto the
    simulated clock: moto issues credentials from the real now, which a simulated hour would
    otherwise leave expired after the first step."""

    def __init__(self, gateway: StsGateway, clock: Clock) -> None:
        self._gateway = gateway
        self._clock = clock

    async def assume_role(self, identity):
        credentials = await self._gateway.assume_role(identity)
        lifetime = credentials.expiration - datetime.now(UTC)
        now = self._clock().replace(microsecond=0)
        return replace(credentials, expiration=now + lifetime, last_updated=now)


class SimulatedCache(NamedTuple):
    clock: Clock
    cache: CredentialCache


@contextlib.asynccontextmanager
async def simulated_cache(
    sts: MotoSts, *, budget: StsBudget | None = None, **options: Any
) -> AsyncIterator[SimulatedCache]:
    """A CredentialCache calling ``sts`` through a fresh gateway, on a fresh simulated clock,
    with ``budget`` (closed with it) and the other CredentialCache ``options``; closed, with its
    gateway, on the way out."""
    clock = Clock()
    gateway = StsGateway(
        region="us-east-1", endpoint_url=sts.endpoint_url, boto_session=fake_session()
    )
    cache = CredentialCache(RetimedGateway(gateway, clock), clock=clock, budget=budget, **options)
    try:
        yield SimulatedCache(clock, cache)
    finally:
        await cache.close()
        if budget is not None:
            await budget.close()
        gateway.close()
