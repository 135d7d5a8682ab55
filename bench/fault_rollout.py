"""The fault suite's agent rollout: the agent process replaced on its port under load.

As the chart's DaemonSet rolls out (maxSurge 1, maxUnavailable 0): the new agent process starts
beside the old one, binds the same port (``SO_REUSEPORT``), listens once its node stream has
delivered a snapshot and steers every new connection to itself (agent/listener.py); only when
it reports ready (its ``--ready-file``) is the old one sent SIGTERM, and it drains. Loopback,
agent processes against an in-process server; half the pods keep their connection alive, half
open one per request. Rolled out twice. Counts: failed requests and connection errors
(target 0).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from bench import pod_load

NAMESPACE = "rollout"
ROLLOUTS = 2


async def _spawn_agent(work: Path, name: str, *, port: int, server_port: int, tls):
    from bench.cluster import spawn_agent

    ready = work / f"{name}.ready"
    process = await spawn_agent(
        work / f"{name}.log", port=port, server_port=server_port, tls=tls,
        args=["--ready-file", str(ready), "--log-level", "info"],
    )  # fmt: skip
    started = time.monotonic()
    while not ready.exists():
        if process.returncode is not None or time.monotonic() - started > 30:
            raise RuntimeError(f"agent {name} did not become ready: {work / f'{name}.log'}")
        await asyncio.sleep(0.02)
    return process, time.monotonic() - started


async def run(section, options) -> None:
    from bench import procs
    from tests.support.kubeapi import KubeApiServer
    from tests.support.moto_sts import MotoSts
    from tests.support.pods import NODE
    from tests.support.server import running_server
    from tests.support.tls import make_tls_dirs

    pods = [(f"127.0.216.{k + 1}", f"rollout-role-{k % 3}") for k in range(8)]
    seconds = options.rollout_load_seconds
    work = Path(tempfile.mkdtemp(prefix="podiam-faults-rollout-"))
    kube, sts = KubeApiServer(), MotoSts()
    await kube.start()
    await asyncio.to_thread(sts.start)
    reasons: list[str] = []
    rows = []
    agents = []
    try:
        kube.add_namespace(NAMESPACE, annotations={"iam.amazonaws.com/permitted": ".*"})
        for k, (ip, role) in enumerate(pods):
            kube.add_pod(NAMESPACE, f"ro-{k}", ip=ip, host_ip=NODE,
                         annotations={"iam.amazonaws.com/role": role})  # fmt: skip
        tls = make_tls_dirs(work / "tls")
        async with running_server(kube, sts, tls, work) as served:
            port = procs.free_port(NODE)
            start = dict(port=port, server_port=served.server.port, tls=tls)
            current, _ = await _spawn_agent(work, "agent-0", **start)
            agents.append(current)
            # Every pod served before the load starts (the agent's node stream has them).
            for ip, role in pods:
                if not await pod_load.served(port, ip, role, within=30):
                    raise RuntimeError("the first agent did not serve its pods")
            load = pod_load.PodLoad(port, pods, mixed_connections=True)
            load.start()
            for n in range(1, ROLLOUTS + 1):
                await asyncio.sleep(seconds / 3)
                before = dict(load.outcomes)
                new, ready_after = await _spawn_agent(work, f"agent-{n}", **start)
                agents.append(new)
                stopping = time.monotonic()
                await procs.stop(current)
                drained = time.monotonic() - stopping
                current = new
                await asyncio.sleep(seconds / 3)
                rows.append((n, load.since(before), ready_after, drained))
            await load.stop()
            reasons = load.reasons
            for process in agents:
                await procs.stop(process)
    finally:
        for process in agents:
            await procs.stop(process)
        await asyncio.to_thread(sts.stop)
        await kube.stop()
    table = section.table(
        f"Agent rollout under load (loopback; {len(pods)} pods asking throughout, half over "
        "kept-alive connections, half a new connection per request)",
        ["rollout", "requests around it", "failed", "new agent ready after s",
         "old agent drained and gone after s"],
    )  # fmt: skip
    failed_total = 0
    for n, during, ready_after, drained in rows:
        failures = pod_load.failed(during)
        failed_total += sum(failures.values())
        shown = ", ".join(f"{k}: {v}" for k, v in sorted(failures.items())) or "0"
        table.add(n, sum(during.values()), shown, round(ready_after, 2), round(drained, 2))
    if reasons:
        shown_reasons = "; ".join(sorted(set(reasons))[:5])
        section.notes.append(f"agent rollout: non-200 answers: {shown_reasons}")
    section.check("agent rollout: failed requests", "0", str(failed_total), failed_total == 0)
    section.data["rollout"] = [
        {"rollout": n, "outcomes": during, "ready_after": ready_after, "drained": drained}
        for n, during, ready_after, drained in rows
    ]
