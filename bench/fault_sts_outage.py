"""The fault suite's STS outage: STS down for 30 minutes while pods hold credentials.

Thirty minutes of wall clock is too long for a benchmark, and the question is about credential
lifetimes, so the credentials cache runs on a simulated clock (as in the STS economy section):
the real Registry, CredentialCache, StsBudget and StsGateway in this process, calling moto
behind the recording front, which answers every AssumeRole with ``ServiceUnavailable`` while
the outage lasts. Each answer's lifetime is moved onto the simulated clock.

The outage starts the moment every held identity's refresh falls due (35 minutes before
expiry, jitter aside) and lasts ``--sts-outage-minutes``: the cache must go on serving what it
holds — never anything expired — refuse identities it holds nothing for at once, and refresh
everything once STS is back. The refresher's backoff between attempts runs in real seconds
(capped at ``retry_max``, 60 s by default), which is what the recovery time measures.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

from bench.simulated_clock import simulated_cache
from bench.sts_budget import _registry, hold_identities
from server.credentials import (
    DEFAULT_REFRESH_BEFORE,
    DEFAULT_REFRESH_JITTER,
    CredentialsUnavailable,
)
from server.identity import MIN_REMAINING, RoleIdentity
from server.sts import DEFAULT_SESSION_DURATION
from server.sts_budget import StsBudget
from tests.support.moto_sts import MotoSts
from tests.support.server import BASE_ARN

OUTAGE_CODE = "ServiceUnavailable"


async def sts_outage(
    sts: MotoSts, *, held: int, minutes: int, step_seconds: float, prefix: str = "so"
) -> dict:
    simulated = simulated_cache(
        sts, budget=StsBudget(), max_sleep=0.05, refresh_jitter=DEFAULT_REFRESH_JITTER
    )
    async with simulated as (clock, cache):
        registry = _registry(cache)
        identities = await hold_identities(
            sts, cache, registry, prefix=prefix, count=held, block=251
        )
        first_keys = {i: cache.peek(i).access_key_id for i in identities}
        counts = {"answers": 0, "refusals": 0, "expired": 0, "under_30_min": 0}
        slowest = 0.0
        stop = asyncio.Event()

        async def probe() -> None:
            nonlocal slowest
            while not stop.is_set():
                for identity in identities:
                    started = time.perf_counter()
                    try:
                        credentials = await cache.get(identity)
                    except CredentialsUnavailable:
                        counts["refusals"] += 1
                        continue
                    finally:
                        slowest = max(slowest, time.perf_counter() - started)
                    counts["answers"] += 1
                    left = credentials.seconds_left(clock())
                    counts["expired"] += left <= 0
                    counts["under_30_min"] += left <= MIN_REMAINING.total_seconds()
                await asyncio.sleep(0.02)

        before = len(sts.calls())
        prober = asyncio.create_task(probe())
        newcomers: list[tuple[float, str]] = []
        try:
            sts.set_failing(True, OUTAGE_CODE)
            # Every held identity's refresh falls due as STS goes away.
            clock.now += DEFAULT_SESSION_DURATION - DEFAULT_REFRESH_BEFORE
            for minute in range(minutes):
                await asyncio.sleep(step_seconds)
                if minute in (0, minutes // 2):
                    # A new pod's identity, nothing held for it: refused, and how fast.
                    newcomer = RoleIdentity(f"{BASE_ARN}{prefix}-new-{minute}", f"{prefix}-new")
                    started = time.perf_counter()
                    try:
                        await cache.get(newcomer)
                        outcome = "served"
                    except CredentialsUnavailable as error:
                        outcome = error.cause.code
                    newcomers.append((time.perf_counter() - started, outcome))
                clock.now += timedelta(minutes=1)
            outage_calls = len(sts.calls()) - before
            sts.set_failing(False)
            back = time.monotonic()

            def refreshed() -> bool:
                return all(
                    (c := cache.peek(i)) is not None and c.access_key_id != first_keys[i]
                    for i in identities
                )

            while not refreshed():
                if time.monotonic() - back > 180:
                    raise RuntimeError("not every identity was refreshed 180 s after STS came back")
                await asyncio.sleep(0.05)
            recovery = time.monotonic() - back
            stop.set()
            await prober
            fresh = sum(
                cache.peek(i).seconds_left(clock()) > MIN_REMAINING.total_seconds()
                for i in identities
            )
        finally:
            sts.set_failing(False)
            stop.set()
    return {
        **counts,
        "slowest_ms": round(slowest * 1000, 1),
        "outage_calls": outage_calls,
        "newcomers": [(round(seconds * 1000), code) for seconds, code in newcomers],
        "recovery_seconds": round(recovery, 1),
        "fresh_after": fresh,
        "held": held,
    }


async def run(section, options) -> None:
    held, minutes = options.sts_outage_held, options.sts_outage_minutes
    sts = MotoSts()
    await asyncio.to_thread(sts.start)
    try:
        result = await sts_outage(
            sts, held=held, minutes=minutes, step_seconds=options.sts_outage_step_seconds
        )
    finally:
        await asyncio.to_thread(sts.stop)
    table = section.table(
        f"STS outage: every AssumeRole answered {OUTAGE_CODE} for {minutes} simulated minutes, "
        f"from the moment {held} held identities' refreshes fall due",
        ["probe answers", "refused", "expired served", "served with ≤ 30 min left",
         "slowest probe ms", "AssumeRole attempts in the outage", "new identity refused in",
         "s to refresh all after", "fresh (> 30 min) after"],
    )  # fmt: skip
    newcomers = ", ".join(f"{ms} ms ({code})" for ms, code in result["newcomers"])
    table.add(result["answers"], result["refusals"], result["expired"], result["under_30_min"],
              result["slowest_ms"], result["outage_calls"], newcomers,
              result["recovery_seconds"], f"{result['fresh_after']}/{held}")  # fmt: skip
    section.notes.append(
        "STS outage: the real CredentialCache, StsBudget and StsGateway on a simulated clock "
        f"(one simulated minute per {options.sts_outage_step_seconds:g} s), moto behind the "
        "recording front answering every AssumeRole with ServiceUnavailable; a probe asks for "
        "every held identity's credentials in rounds, as the pods holding them (and the agents "
        "serving them) do. Refreshes start 35 minutes before expiry, so a 30-minute outage "
        "ends with about 5 minutes left: old credentials are served, never expired ones. "
        "Recovery is the refresher's next attempt, in real seconds (its backoff doubles up to "
        "60 s while STS fails)."
    )
    section.check("STS outage: held identities refused", "0", str(result["refusals"]),
                  result["refusals"] == 0)  # fmt: skip
    section.check("STS outage: expired credentials served", "0", str(result["expired"]),
                  result["expired"] == 0)  # fmt: skip
    section.check(
        "STS outage: a new identity refused, not served",
        OUTAGE_CODE,
        newcomers,
        all(code == OUTAGE_CODE for _, code in result["newcomers"]),
    )
    section.data["sts_outage"] = result
