"""STS economy with workload identities and the rate budget: the figures of the STS economy
section that depend on sessions named after workloads and on the priority token bucket.

- a simulated hour of 1,000 pods in 50 Deployments over 10 roles: AssumeRole per refresh round
  must be 50 (one per workload), not 1,000;
- a burst of new pods of one new Deployment through the real agent and server: exactly one
  AssumeRole, every first request answered 200 within the SDK's one second;
- a flood of new identities at once with ``--sts-qps 50`` while every held identity's refresh
  falls due: STS never sees more than the bucket allows, first fetches before refreshes, and no
  pod holding valid credentials refused;
- injected throttling (the test STS answering ``Throttling``) while refreshes are due and then
  overdue: no pod holding valid credentials refused.

The flood and throttling runs use the real Registry, CredentialCache, StsBudget and StsGateway
in this process, against moto behind the recording front (which timestamps each AssumeRole it
receives), with the cache's wall clock injected so refreshes can be made due at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import timedelta

from bench import procs
from bench.cluster import CREDENTIALS, NAMESPACE, NODE, LoopbackCluster, pod_ip
from bench.simulated_clock import simulated_cache
from bench.sts_economy import _settle, run_the_hour
from server.arn import RoleResolver
from server.credentials import (
    DEFAULT_REFRESH_BEFORE,
    DEFAULT_REFRESH_JITTER,
    CredentialCache,
    CredentialsUnavailable,
)
from server.identity import RoleIdentity
from server.registry import Registry
from server.sessions import SessionNameFrom, session_namer
from server.sts import DEFAULT_SESSION_DURATION
from server.sts_budget import StsBudget
from tests.support.moto_sts import MotoSts
from tests.support.objects import namespace_object, pod_object, replica_pod_object
from tests.support.server import BASE_ARN
from tests.support.waiting import eventually

TEMPLATE_HASH = "6f8d9c7b5"


def _registry(cache: CredentialCache) -> Registry:
    registry = Registry(
        resolver=RoleResolver(BASE_ARN),
        session_name=session_namer(SessionNameFrom.WORKLOAD, "podiam"),
        credentials=cache,
    )
    registry.namespace_sink.upsert(namespace_object(NAMESPACE, permitted=".*"))
    return registry


async def hold_identities(
    sts: MotoSts,
    cache: CredentialCache,
    registry: Registry,
    *,
    prefix: str,
    count: int,
    block: int,
) -> list[RoleIdentity]:
    """``count`` pods with a role each (``<prefix>-role-<k>``) stored in ``registry``, their IPs
    from ``block``: the identities they hold, once the cache has credentials for every one."""
    for k in range(count):
        registry.pod_sink.upsert(
            pod_object(NAMESPACE, f"{prefix}-{k}", ip=pod_ip(k, block=block),
                       role=f"{prefix}-role-{k}")
        )  # fmt: skip
    await _settle(sts, prefix)
    identities = [registry.lookup(pod_ip(k, block=block)).grant.identity for k in range(count)]
    # _settle alone is not enough: on a busy machine the first fetches may not have begun yet
    # (no call for a few ms reads as settled), and would then be made after the clock moves.
    await eventually(lambda: all(cache.peek(i) is not None for i in identities), timeout=60)
    return identities


# ---- 1. a simulated hour of Deployments -----------------------------------------------------


async def workload_hour(sts: MotoSts, *, pods: int, workloads: int, roles: int, prefix: str):
    async with simulated_cache(sts, max_sleep=0.01) as (clock, cache):
        registry = _registry(cache)
        for k in range(pods):
            deployment = f"{prefix}-deploy-{k % workloads}"
            obj = replica_pod_object(
                NAMESPACE,
                deployment,
                k,
                template_hash=TEMPLATE_HASH,
                ip=pod_ip(k, block=230),
                role=f"{prefix}-role-{(k % workloads) % roles}",
            )
            registry.pod_sink.upsert(obj)
        return (await run_the_hour(sts, prefix, clock)).rounds


# ---- 2. a burst of one new Deployment's pods through agent and server -----------------------


async def deployment_burst(cluster: LoopbackCluster, *, pods: int, prefix: str):
    role = f"{prefix}-role"
    deployment = f"{prefix}-web"
    objects, targets = [], []
    for k in range(pods):
        ip = pod_ip(k, block=240)
        obj = replica_pod_object(
            NAMESPACE,
            deployment,
            k,
            template_hash=TEMPLATE_HASH,
            ip=ip,
            host_ip=NODE,
            role=role,
            node_name="bench-node",
        )
        objects.append(obj)
        targets.append([ip, CREDENTIALS + role, {}])
    start_at = time.time() + 1.5
    spec = {
        "host": NODE,
        "port": cluster.agent_port,
        "targets": targets,
        "requests": pods,
        "concurrency": pods,
        "keepalive": False,
        "warmup": False,
        "start_at": start_at,
    }
    generator = asyncio.create_task(
        procs.generate("bench.loadgen", spec, measured_pid=cluster.agent_pid)
    )
    await asyncio.sleep(max(0.0, start_at - time.time()))
    for obj in objects:
        cluster.kube.store.create("pods", obj)
    result = await generator
    calls = await _settle(cluster.sts, prefix)
    return calls, result


# ---- 3. a flood of new identities under the budget ------------------------------------------


async def _probe(cache: CredentialCache, identities, stop: asyncio.Event) -> tuple[int, int, float]:
    """Ask for every held identity's credentials in rounds until ``stop``: as pods holding
    valid credentials do. (answers, refusals, slowest answer in seconds)."""
    answers = refusals = 0
    slowest = 0.0
    while not stop.is_set():
        for identity in identities:
            started = time.perf_counter()
            try:
                await cache.get(identity)
                answers += 1
            except CredentialsUnavailable:
                refusals += 1
            slowest = max(slowest, time.perf_counter() - started)
        await asyncio.sleep(0.05)
    return answers, refusals, slowest


async def flood(sts: MotoSts, *, identities: int, held: int, qps: float, burst: int, prefix: str):
    simulated = simulated_cache(
        sts,
        budget=StsBudget(qps=qps, burst=burst),
        max_sleep=0.05,
        refresh_jitter=DEFAULT_REFRESH_JITTER,
    )
    async with simulated as (clock, cache):
        registry = _registry(cache)
        held_prefix, new_prefix = f"{prefix}h", f"{prefix}n"
        held_identities = await hold_identities(
            sts, cache, registry, prefix=held_prefix, count=held, block=245
        )
        stop = asyncio.Event()
        probe = asyncio.create_task(_probe(cache, held_identities, stop))
        try:
            flood_started = time.monotonic()
            # The new pods arrive, and at the same moment every held identity's refresh falls due.
            for k in range(identities):
                registry.pod_sink.upsert(
                    pod_object(NAMESPACE, f"{new_prefix}-{k}", ip=pod_ip(k, block=100),
                               role=f"{new_prefix}-role-{k}")
                )  # fmt: skip
            clock.now += DEFAULT_SESSION_DURATION - DEFAULT_REFRESH_BEFORE + timedelta(minutes=3)
            while True:
                await asyncio.sleep(0.5)
                calls = [c for c in sts.calls() if c.at >= flood_started]
                new = sum(c.role_arn.startswith(BASE_ARN + new_prefix) for c in calls)
                refreshed = sum(c.role_arn.startswith(BASE_ARN + held_prefix) for c in calls)
                if new >= identities and refreshed >= held:
                    break
            stop.set()
            answers, refusals, slowest = await probe
        finally:
            stop.set()
    calls = sorted((c for c in sts.calls() if c.at >= flood_started), key=lambda c: c.at)
    per_second = Counter(int(c.at - flood_started) for c in calls)
    # The bucket's own invariant: by time t, at most burst + qps * t calls.
    worst = max(n + 1 - (burst + qps * (c.at - flood_started)) for n, c in enumerate(calls))
    last_first = max(i for i, c in enumerate(calls) if c.role_arn.startswith(BASE_ARN + new_prefix))
    refreshes_before = sum(
        c.role_arn.startswith(BASE_ARN + held_prefix) for c in calls[: last_first + 1]
    )
    duration = calls[-1].at - flood_started
    steady = [per_second[s] for s in range(1, int(duration))]
    return {
        "calls": len(calls),
        "seconds": round(duration, 1),
        "max_per_second": max(per_second.values()),
        "max_per_second_after_first": max(steady) if steady else 0,
        "mean_rate_after_burst": round(max(0, len(calls) - burst) / duration, 1),
        "within_bucket": worst <= 1e-6,
        "refreshes_before_last_first_fetch": refreshes_before,
        "probe_answers": answers,
        "probe_refusals": refusals,
        "probe_slowest_ms": round(1000 * slowest, 1),
    }


# ---- 4. throttling ---------------------------------------------------------------------------


async def throttled(sts: MotoSts, *, held: int, seconds: float, prefix: str):
    simulated = simulated_cache(
        sts,
        budget=StsBudget(),
        max_sleep=0.05,
        refresh_jitter=DEFAULT_REFRESH_JITTER,
        retry_max=2.0,
    )
    async with simulated as (clock, cache):
        registry = _registry(cache)
        identities = await hold_identities(
            sts, cache, registry, prefix=prefix, count=held, block=250
        )
        before = len(sts.calls())
        stop = asyncio.Event()
        probe = asyncio.create_task(_probe(cache, identities, stop))
        try:
            sts.set_failing(True, "Throttling")
            # Refreshes due, then overdue: under 30 minutes left, while STS keeps saying no.
            clock.now += DEFAULT_SESSION_DURATION - DEFAULT_REFRESH_BEFORE + timedelta(minutes=3)
            await asyncio.sleep(seconds / 2)
            clock.now += timedelta(minutes=10)
            await asyncio.sleep(seconds / 2)
            throttled_calls = sum(c.failed_with == "Throttling" for c in sts.calls()[before:])
            sts.set_failing(False)
            recovered_at = time.monotonic()

            def all_refreshed() -> bool:
                answered = {c.role_arn for c in sts.calls()[before:] if c.failed_with is None}
                return len(answered) >= held

            await eventually(all_refreshed, timeout=120, interval=0.1)
            recovery = time.monotonic() - recovered_at
            stop.set()
            answers, refusals, slowest = await probe
        finally:
            sts.set_failing(False)
            stop.set()
    return {
        "throttled_answers": throttled_calls,
        "probe_answers": answers,
        "probe_refusals": refusals,
        "probe_slowest_ms": round(1000 * slowest, 1),
        "recovery_seconds": round(recovery, 1),
    }
