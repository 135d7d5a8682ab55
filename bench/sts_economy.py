"""STS economy: AssumeRole calls for N pods sharing M roles, over a simulated hour of refreshes
and in a burst of concurrent first requests. The calls must be M per refresh, not N.

Pods share a role identity — and so one AssumeRole — only when everything that goes into the
call is the same: role ARN, external id and session name. The session name is
``<prefix>-<session-name annotation or pod name>``, so the pods of each role here carry a shared
``iam.amazonaws.com/session-name`` annotation; the rows "pod-name sessions" show what happens
without it (one identity, and one call, per pod).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from prometheus_client import REGISTRY

from bench import procs
from bench.cluster import CREDENTIALS, NAMESPACE, NODE, LoopbackCluster, pod_ip, pod_specs
from bench.report import Section
from server.arn import RoleResolver
from server.credentials import DEFAULT_REFRESH_BEFORE, CredentialCache
from server.registry import Registry
from server.sts import DEFAULT_SESSION_DURATION, StsGateway, session_name_for
from tests.support.moto_sts import MotoSts, fake_session
from tests.support.objects import namespace_object, pod_object
from tests.support.server import BASE_ARN

HOUR = timedelta(hours=1)
STEP = timedelta(minutes=1)


class _Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


class _RetimedGateway:
    """The real gateway (real STS calls to moto), with each answer's lifetime moved onto the
    simulated clock: moto issues credentials from the real now, which a simulated hour would
    otherwise leave expired after the first step."""

    def __init__(self, gateway: StsGateway, clock: _Clock) -> None:
        self._gateway = gateway
        self._clock = clock

    async def assume_role(self, identity):
        credentials = await self._gateway.assume_role(identity)
        lifetime = credentials.expiration - datetime.now(UTC)
        now = self._clock().replace(microsecond=0)
        return replace(credentials, expiration=now + lifetime, last_updated=now)


async def _settle(sts: MotoSts, prefix: str) -> int:
    """Wait until AssumeRole calls for ``prefix`` roles stop coming; their count."""
    last, stable = -1, 0
    while stable < 3:
        await asyncio.sleep(0.03)
        count = len([c for c in sts.calls() if c.role_arn.startswith(BASE_ARN + prefix)])
        stable = stable + 1 if count == last else 0
        last = count
    return last


async def simulated_hour(sts: MotoSts, *, pods: int, roles: int, shared: bool, prefix: str):
    """Calls per refresh round for ``pods`` pods of ``roles`` roles over one simulated hour."""
    clock = _Clock()
    gateway = StsGateway(
        region="us-east-1", endpoint_url=sts.endpoint_url, boto_session=fake_session()
    )
    cache = CredentialCache(_RetimedGateway(gateway, clock), clock=clock, max_sleep=0.01)
    registry = Registry(
        resolver=RoleResolver(BASE_ARN),
        session_name=lambda pod: session_name_for("podiam", pod.session_name or pod.name),
        credentials=cache,
    )
    registry.namespace_sink.upsert(namespace_object(NAMESPACE, permitted=".*"))
    for k in range(pods):
        annotations = {"iam.amazonaws.com/session-name": f"{prefix}-app-{k % roles}"}
        registry.pod_sink.upsert(
            pod_object(
                NAMESPACE,
                f"{prefix}-{k}",
                ip=pod_ip(k, block=200),
                host_ip=NODE,
                role=f"{prefix}-role-{k % roles}",
                annotations=annotations if shared else None,
            )
        )
    timeline = [(0, await _settle(sts, prefix))]
    minutes = int(HOUR / STEP)
    try:
        for minute in range(1, minutes + 1):
            clock.now += STEP
            timeline.append((minute, await _settle(sts, prefix)))
    finally:
        await cache.close()
        gateway.close()
    period = int((DEFAULT_SESSION_DURATION - DEFAULT_REFRESH_BEFORE) / STEP)
    rounds = []
    for start in range(0, minutes + 1, period):
        before = timeline[start - 1][1] if start else 0
        end = min(start + period - 1, minutes)
        rounds.append(timeline[end][1] - before)
    return timeline[-1][1], rounds, period


async def burst(cluster: LoopbackCluster, *, pods: int, roles: int, shared: bool, prefix: str):
    """``pods`` new pods, each asking the agent for credentials the moment it is listed: the
    load generator (its own process) is started first and sends every request, all at once,
    at the moment the pods are added to the API server."""
    block = 210 if shared else 220
    created, specs = pod_specs(pods, block=block, roles=roles, prefix=prefix, shared_session=shared)
    start_at = time.time() + 1.5
    spec = {
        "host": NODE,
        "port": cluster.agent_port,
        "targets": [[ip, CREDENTIALS + role, {}] for ip, _name, role in created],
        "requests": pods,
        "concurrency": pods,
        "keepalive": False,
        "warmup": False,
        "start_at": start_at,
    }
    sts_before = _assume_role_seconds()
    generator = asyncio.create_task(
        procs.generate("bench.loadgen", spec, measured_pid=cluster.agent_pid)
    )
    await asyncio.sleep(max(0.0, start_at - time.time()))
    cluster.kube.add_pods(specs)
    result = await generator
    calls = await _settle(cluster.sts, prefix)
    (total_after, count_after), (total_before, count_before) = _assume_role_seconds(), sts_before
    total, count = total_after - total_before, count_after - count_before
    result["assume_role_mean_ms"] = 1000 * total / count if count else 0.0
    return calls, result["statuses"].get("200", 0), result


def _assume_role_seconds() -> tuple[float, float]:
    """(sum, count) of the in-process server's AssumeRole latency histogram."""
    sample = REGISTRY.get_sample_value
    return (
        sample("podiam_sts_assume_role_duration_seconds_sum") or 0.0,
        sample("podiam_sts_assume_role_duration_seconds_count") or 0.0,
    )


async def run(section: Section, cluster: LoopbackCluster, options) -> None:
    n, m = options.sts_pods, options.sts_roles
    contrast = min(n, 100)
    period_minutes = int((DEFAULT_SESSION_DURATION - DEFAULT_REFRESH_BEFORE) / STEP)
    section.notes += [
        "session names are `<prefix>-<pod name or session-name annotation>`, so pods share an "
        "identity (and an AssumeRole) only when they share the session-name annotation: the "
        "pods of each role here carry one. Rows marked `pod-name sessions` leave it out.",
        f"simulated hour: the real Registry and CredentialCache (1 h sessions, refreshed "
        f"{DEFAULT_REFRESH_BEFORE} before expiry: every {period_minutes} min) on an injected "
        "clock moved in 1-minute steps, with real AssumeRole calls to moto (each answer's "
        "lifetime moved onto the simulated clock); calls counted by the STS front.",
        "burst: new pods listed in the Kubernetes API and, at that moment, one credentials "
        "request from each through the agent, all concurrent (from the load generator's "
        "process); calls counted by the STS front. Answers other than 200 are listed by status. "
        "A first request waits for its pod's credentials (at most `--pod-wait`, 0.9 s, then the "
        "unary fallback): its latency is the AssumeRole's, here moto's, serving the calls in the "
        "benchmark's own process — the last column, from podiam-server's "
        "`podiam_sts_assume_role_duration_seconds`.",
    ]
    hour = section.table(
        "simulated hour", ["pods (N)", "roles (M)", "sessions", "AssumeRole calls",
                           "calls per refresh round", "expected per round"]
    )  # fmt: skip
    total, rounds, _ = await simulated_hour(cluster.sts, pods=n, roles=m, shared=True, prefix="hr")
    hour.add(n, m, "shared annotation", total, " / ".join(map(str, rounds)), m)
    section.check(
        f"simulated hour: AssumeRole calls per refresh round ({n} pods, {m} roles)",
        f"= {m} each round",
        " / ".join(map(str, rounds)),
        all(r == m for r in rounds),
    )
    total2, rounds2, _ = await simulated_hour(
        cluster.sts, pods=contrast, roles=m, shared=False, prefix="hp"
    )
    hour.add(contrast, m, "pod-name sessions", total2, " / ".join(map(str, rounds2)), contrast)

    table = section.table(
        "burst of concurrent first requests",
        ["pods (N)", "roles (M)", "sessions", "answered 200", "other answers",
         "AssumeRole calls", "expected", "p50 ms", "p99 ms", "max ms",
         "AssumeRole mean ms (moto)"],
    )  # fmt: skip
    calls, ok, latency = await burst(cluster, pods=n, roles=m, shared=True, prefix="bs")
    table.add(n, m, "shared annotation", ok, _others(latency), calls, m,
              latency["p50_ms"], latency["p99_ms"], latency["max_ms"],
              latency["assume_role_mean_ms"])  # fmt: skip
    section.check(
        f"burst: AssumeRole calls for {n} concurrent first requests ({m} roles)",
        f"= {m}, all answered",
        f"{calls} calls, {ok}/{n} answered",
        calls == m and ok == n,
    )
    calls2, ok2, latency2 = await burst(cluster, pods=contrast, roles=m, shared=False, prefix="bp")
    table.add(contrast, m, "pod-name sessions", ok2, _others(latency2), calls2, contrast,
              latency2["p50_ms"], latency2["p99_ms"], latency2["max_ms"],
              latency2["assume_role_mean_ms"])  # fmt: skip
    section.data.update(
        hour={"total": total, "rounds": rounds, "contrast_rounds": rounds2},
        burst={"calls": calls, "ok": ok, "latency": latency, "contrast_calls": calls2},
    )


def _others(result: dict) -> str:
    others = {k: v for k, v in result["statuses"].items() if k != "200"}
    if result["errors"]:
        others["connection errors"] = result["errors"]
    return ", ".join(f"{k}: {v}" for k, v in sorted(others.items())) or "—"
