"""Pod start: from a pod's appearance in the Kubernetes watch to the agent answering its
credentials request, for pods started one after another.

Each pod's request is sent the moment the pod is added to the API server, as an SDK in a
container that starts at once would: the agent holds it until the node stream brings the pod
(woken by the stream, not polling), so the time measured is watch event → server → STS
(prefetch) → node stream → agent → answer.
"""

from __future__ import annotations

import asyncio
import time

from bench import procs
from bench.cluster import (
    CREDENTIALS,
    NAMESPACE,
    NODE,
    ROLE,
    SESSION_NAME,
    LoopbackCluster,
    wait_served,
)
from bench.cluster import pod_ip as make_ip
from bench.report import Section


async def _start(cluster: LoopbackCluster, *, count: int, block: int, shared: bool, prefix: str):
    seconds, failures = [], 0
    for k in range(count):
        ip, name, role = make_ip(k, block=block), f"{prefix}-start-{k}", f"{prefix}-role-0"
        annotations = {ROLE: role}
        if shared:
            annotations[SESSION_NAME] = f"{prefix}-app-0"  # the seed pod's identity
        else:
            role = f"{prefix}-role-{k}"  # a role nobody holds yet: STS is on the path
            annotations[ROLE] = role
        started = time.perf_counter()
        cluster.kube.add_pod(
            NAMESPACE, name, ip=ip, host_ip=NODE, annotations=annotations, node_name="bench-node"
        )
        status, _ = await cluster.get(ip, CREDENTIALS + role)
        elapsed = time.perf_counter() - started
        if status == 200:
            seconds.append(elapsed)
        else:
            failures += 1
        await asyncio.sleep(0.01)
    return seconds, failures


async def run(section: Section, cluster: LoopbackCluster, options) -> None:
    count = options.start_pods
    # Warm the shared identity: its credentials are at the agent before the timed pods start.
    seed = cluster.add_pods(1, block=100, roles=1, prefix="ps-shared-seed")
    await wait_served(cluster, seed)
    section.notes += [
        f"{count} pods per row, started one after another (10 ms apart); each pod's "
        "credentials request is sent the moment it is added to the API server.",
        "`cached identity`: the pods share a role and session-name annotation whose "
        "credentials the agent already holds; `new identity`: each pod has a role nobody "
        "holds, so the server's prefetch (AssumeRole to moto, in this process) is on the path.",
        "Kubernetes API server, moto and podiam-server in the benchmark process; the agent in "
        "its own.",
    ]
    table = section.table(
        "watch event → credentials served",
        ["pods", "identity", "answered", "p50 ms", "p99 ms", "max ms"],
    )
    rows = {}
    for label, shared, prefix, block in (
        ("cached identity", True, "ps-shared-seed", 101),
        ("new identity (prefetch)", False, "ps-new", 102),
    ):
        seconds, failures = await _start(
            cluster, count=count, block=block, shared=shared, prefix=prefix
        )
        summary = procs.latency_summary(seconds)
        rows[label] = {**summary, "answered": len(seconds), "failures": failures}
        table.add(
            count, label, f"{len(seconds)}/{count}",
            summary["p50_ms"], summary["p99_ms"], summary["max_ms"],
        )  # fmt: skip
        section.check(
            f"pod start p99, {label}",
            "< 100 ms, all answered",
            f"{summary['p99_ms']:.1f} ms, {len(seconds)}/{count}",
            summary["p99_ms"] < 100 and not failures,
        )
    section.data["rows"] = rows
