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
from datetime import timedelta
from typing import NamedTuple

from prometheus_client import REGISTRY

from bench import procs
from bench.cluster import CREDENTIALS, NAMESPACE, NODE, LoopbackCluster, pod_ip, pod_specs
from bench.report import Section
from bench.simulated_clock import Clock, simulated_cache
from server.arn import RoleResolver
from server.credentials import DEFAULT_REFRESH_BEFORE
from server.registry import Registry
from server.sts import DEFAULT_SESSION_DURATION, session_name_for
from tests.support.moto_sts import MotoSts
from tests.support.objects import namespace_object, pod_object
from tests.support.server import BASE_ARN

HOUR = timedelta(hours=1)
STEP = timedelta(minutes=1)


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
    async with simulated_cache(sts, max_sleep=0.01) as (clock, cache):
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
        return await run_the_hour(sts, prefix, clock)


class Hour(NamedTuple):
    total: int  # AssumeRole calls in the hour
    rounds: list[int]  # the calls of each refresh round
    period: int  # a round's length, in steps
    per_step: list[int]  # the calls of each step (minute 0 is the first fetch)


async def run_the_hour(sts: MotoSts, prefix: str, clock: Clock) -> Hour:
    """Move ``clock`` through an hour in steps, letting the cache refresh at each, and count
    AssumeRole calls."""
    timeline = [(0, await _settle(sts, prefix))]
    minutes = int(HOUR / STEP)
    for minute in range(1, minutes + 1):
        clock.now += STEP
        timeline.append((minute, await _settle(sts, prefix)))
    period = int((DEFAULT_SESSION_DURATION - DEFAULT_REFRESH_BEFORE) / STEP)
    rounds = []
    for start in range(0, minutes + 1, period):
        before = timeline[start - 1][1] if start else 0
        end = min(start + period - 1, minutes)
        rounds.append(timeline[end][1] - before)
    per_step = [count - (timeline[i - 1][1] if i else 0) for i, (_, count) in enumerate(timeline)]
    return Hour(timeline[-1][1], rounds, period, per_step)


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
        "rows marked `shared annotation`: the pods of each role carry one "
        "`iam.amazonaws.com/session-name`, which wins over every `--session-name-from`. Rows "
        "marked `pod-name sessions`: bare pods without it, each its own workload and so its "
        "own session (what `--session-name-from pod` makes of every pod).",
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
    total, rounds, _, per_minute = await simulated_hour(
        cluster.sts, pods=n, roles=m, shared=True, prefix="hr"
    )
    hour.add(n, m, "shared annotation", total, " / ".join(map(str, rounds)), m)
    section.check(
        f"simulated hour: AssumeRole calls per refresh round ({n} pods, {m} roles)",
        f"= {m} each round",
        " / ".join(map(str, rounds)),
        all(r == m for r in rounds),
    )
    total2, rounds2, _, per_minute2 = await simulated_hour(
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
        hour={
            "total": total,
            "rounds": rounds,
            "contrast_rounds": rounds2,
            "pods": n,
            "roles": m,
            "contrast_pods": contrast,
            "calls_per_minute": per_minute,
            "contrast_calls_per_minute": per_minute2,
        },
        burst={"calls": calls, "ok": ok, "latency": latency, "contrast_calls": calls2},
    )

    await _workload_figures(section, cluster, options)


GATEWAY_WORKERS = 8  # StsGateway's default thread pool: calls granted together overlap there


async def _workload_figures(section: Section, cluster: LoopbackCluster, options) -> None:
    from bench import sts_budget

    n, m = options.sts_pods, options.sts_roles
    w = min(options.sts_workloads, n)
    section.notes += [
        "workload identities (the default `--session-name-from workload`): pods owned by a "
        "ReplicaSet named `<deployment>-<pod-template-hash>`, so their sessions are named "
        "after the Deployment and its replicas share one identity.",
        "flood and throttling: the real Registry, CredentialCache, StsBudget and StsGateway in "
        "the benchmark's process against moto behind the recording front, which timestamps "
        "each AssumeRole it receives; the cache's wall clock is moved so that every held "
        "identity's refresh falls due as the new identities appear. A probe asks for every "
        "held identity's credentials in rounds throughout, as pods holding them would.",
    ]
    rounds = await sts_budget.workload_hour(cluster.sts, pods=n, workloads=w, roles=m, prefix="wh")
    hour = section.table(
        "simulated hour, workload sessions",
        ["pods", "Deployments", "roles", "calls per refresh round", "expected per round"],
    )
    hour.add(n, w, m, " / ".join(map(str, rounds)), w)
    section.check(
        f"workload hour: AssumeRole per refresh round ({n} pods, {w} Deployments, {m} roles)",
        f"= {w} each round (not {n})",
        " / ".join(map(str, rounds)),
        all(r == w for r in rounds),
    )

    p = options.sts_burst_pods
    calls, result = await sts_budget.deployment_burst(cluster, pods=p, prefix="wb")
    ok = result["statuses"].get("200", 0)
    burst_table = section.table(
        "burst: new pods of one new Deployment, every pod asking at once",
        ["pods", "AssumeRole calls", "answered 200", "other answers", "p50 ms", "p99 ms",
         "max ms"],
    )  # fmt: skip
    burst_table.add(p, calls, ok, _others(result), result["p50_ms"], result["p99_ms"],
                    result["max_ms"])  # fmt: skip
    section.check(
        f"Deployment burst: {p} first requests",
        "1 AssumeRole, all 200 within 1 s",
        f"{calls} calls, {ok}/{p} answered 200, max {result['max_ms']:.0f} ms, "
        f"p99 {result['p99_ms']:.0f} ms",
        calls == 1 and ok == p and result["max_ms"] < 1000,
    )

    f, h, qps = options.sts_flood, options.sts_flood_held, options.sts_flood_qps
    flood = await sts_budget.flood(cluster.sts, identities=f, held=h, qps=qps, burst=100,
                                   prefix="fl")  # fmt: skip
    flood_table = section.table(
        f"flood: {f} new identities at once, {h} held identities' refreshes due, "
        f"--sts-qps {qps:g} --sts-burst 100",
        ["AssumeRole calls", "seconds", "max calls in a second", "max after the first second",
         "within burst + qps·t", "mean rate after the burst /s",
         "refreshes reaching STS before the last first fetch",
         "probe answers", "probe refusals", "slowest probe ms"],
    )  # fmt: skip
    flood_table.add(flood["calls"], flood["seconds"], flood["max_per_second"],
                    flood["max_per_second_after_first"], flood["within_bucket"],
                    flood["mean_rate_after_burst"],
                    flood["refreshes_before_last_first_fetch"], flood["probe_answers"],
                    flood["probe_refusals"], flood["probe_slowest_ms"])  # fmt: skip
    section.check(
        f"flood of {f} identities: STS sees no more than the budget, first fetches first, "
        "no pod with valid credentials refused",
        f"≤ 100 + {qps:g}·t calls by t, no refresh ahead of a queued first fetch (at most "
        f"{GATEWAY_WORKERS} overlap in the gateway's threads), 0 refusals",
        f"max {flood['max_per_second']}/s ({flood['max_per_second_after_first']}/s after the "
        f"first second), {flood['refreshes_before_last_first_fetch']} refreshes first, "
        f"{flood['probe_refusals']} refusals",
        flood["within_bucket"]
        and flood["refreshes_before_last_first_fetch"] <= GATEWAY_WORKERS
        and flood["probe_refusals"] == 0,
    )

    seconds = options.sts_throttle_seconds
    throttle = await sts_budget.throttled(cluster.sts, held=h, seconds=seconds, prefix="th")
    throttle_table = section.table(
        f"throttling: STS answers Throttling for {seconds:g} s while {h} identities' refreshes "
        "fall due and then run under 30 minutes left",
        ["Throttling answers", "probe answers", "probe refusals", "slowest probe ms",
         "seconds to refresh all after"],
    )  # fmt: skip
    throttle_table.add(throttle["throttled_answers"], throttle["probe_answers"],
                       throttle["probe_refusals"], throttle["probe_slowest_ms"],
                       throttle["recovery_seconds"])  # fmt: skip
    section.check(
        "throttling: pods holding valid credentials refused",
        "0",
        str(throttle["probe_refusals"]),
        throttle["probe_refusals"] == 0,
    )
    section.data.update(
        workload_hour={"rounds": rounds, "expected": w},
        workload_burst={"calls": calls, "ok": ok, "pods": p, "latency": result},
        flood=flood,
        throttle=throttle,
    )


def _others(result: dict) -> str:
    others = {k: v for k, v in result["statuses"].items() if k != "200"}
    if result["errors"]:
        others["connection errors"] = result["errors"]
    return ", ".join(f"{k}: {v}" for k, v in sorted(others.items())) or "—"
