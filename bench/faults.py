"""The fault suite: what pods see while parts of podiam fail, as counts.

Each fault runs under load from pods whose credentials are cached, and reports how many
requests failed, how many AssumeRole calls it cost, and how long refusals and recovery took.
The figures are measured here and printed; the checks are counts (failures, wrong roles), never
wall-clock bounds.

- ``replica``: one of two server replicas SIGKILLed (network namespaces, real DNAT, processes).
- ``outage``: every replica SIGKILLed for ``--outage-seconds``, then restarted.
- ``partition``: the agent's node cut from the servers (its LAN link down) as long, then healed.
- ``churn``: pod IPs handed from pod to pod across namespaces and roles (loopback, in-process
  server and agent, so that the moment the server saw a deletion can be read exactly).
- ``churn-routes``: the same hand-overs on a node with per-pod veths and host routes, in kubelet
  order, with the agent's route evidence and real DNAT (bench/fault_churn_routes.py).
- ``sts-outage``: STS down for 30 minutes on a simulated clock (bench/fault_sts_outage.py).
- ``kube``: the Kubernetes API down, then watches dropped and expired (410) in bursts
  (bench/fault_kube.py).
- ``rotation``: the mutual-TLS material replaced under load (bench/fault_rotation.py).
- ``rollout``: the agent replaced by a new process on the same port under load
  (bench/fault_rollout.py).

``--faults`` picks some of them (``replica`` also runs the outage and the partition).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from bench.procs import percentile
from bench.real_client import problem
from bench.report import Section

CREDS = "/latest/meta-data/iam/security-credentials/"


async def run(section: Section, options) -> None:
    from bench import (
        fault_churn_routes,
        fault_kube,
        fault_rollout,
        fault_rotation,
        fault_sts_outage,
    )

    wanted = set(options.faults)
    if "replica" in wanted:
        netns_problem = problem()
        if netns_problem:
            section.notes.append(f"replica, outage and partition faults skipped: {netns_problem}")
        else:
            await _replica_and_outage(section, options)
    if "churn" in wanted:
        await _churn(section, options)
    if "churn-routes" in wanted:
        await fault_churn_routes.run(section, options)
    if "sts-outage" in wanted:
        await fault_sts_outage.run(section, options)
    if "kube" in wanted:
        await fault_kube.run(section, options)
    if "rotation" in wanted:
        await fault_rotation.run(section, options)
    if "rollout" in wanted:
        await fault_rollout.run(section, options)


# ---- replica loss and full outage, in network namespaces ---------------------------------------


async def _streams_live(pod, node) -> int:
    from tests.support.e2e import AGENT_METRICS_PORT

    got = await pod.netns.fetch(f"http://{node.ip}:{AGENT_METRICS_PORT}/metrics")
    for line in got.body.splitlines():
        if line.startswith("podiam_agent_node_streams_live"):
            return int(float(line.split()[-1]))
    return -1


async def _until_streams(pod, count: int, seconds: float = 60) -> float:
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if await _streams_live(pod, pod.node) == count:
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    raise RuntimeError(f"the agent did not reach {count} live streams in {seconds:g}s")


def _failures(results) -> tuple[int, int, float]:
    total = sum(sum(counts.values()) for counts, _ in results)
    failed = sum(n for counts, _ in results for status, n in counts.items() if status != "200")
    slowest = max((slowest for _, slowest in results), default=0.0)
    return total, failed, slowest


async def _replica_and_outage(section: Section, options) -> None:
    from tests.support.e2e import PodiamCluster

    pods_count, load = options.fault_pods, options.fault_load_seconds
    async with PodiamCluster(workers=1, servers=2, permitted={"apps": "app-.*"}) as podiam:
        pods = [
            podiam.add_pod(0, "apps", f"cached-{n}", f"app-cached-{n}") for n in range(pods_count)
        ]
        for pod in pods:
            for _ in range(100):
                if (await pod.fetch(CREDS + pod.role)).status == 200:
                    break
                await asyncio.sleep(0.1)
        await _until_streams(pods[0], 2)
        await asyncio.sleep(1.0)  # every credential on both streams
        table = section.table(
            "Faults under load from pods with cached credentials (network namespaces)",
            [
                "fault",
                "requests",
                "failed",
                "AssumeRole during the fault",
                "slowest request s",
                "other",
            ],
        )

        # One of two replicas SIGKILLed in the middle of the load.
        assumed = podiam.sts.assume_role_calls()
        running = [asyncio.create_task(pod.hammer(CREDS + pod.role, load)) for pod in pods]
        await asyncio.sleep(load / 3)
        await podiam.servers[1].kill()
        total, failed, slowest = _failures(await asyncio.gather(*running))
        extra = podiam.sts.assume_role_calls() - assumed
        await podiam.servers[1].start()
        back = await _until_streams(pods[0], 2)
        table.add(
            "one of two replicas SIGKILLed", total, failed, extra, round(slowest, 3),
            f"second stream back {back:.2f}s after the restart",
        )  # fmt: skip
        section.check("replica SIGKILL: failed requests", "0", str(failed), failed == 0)
        section.check("replica SIGKILL: extra AssumeRole", "0", str(extra), extra == 0)

        # Every replica down for a while.
        outage = options.outage_seconds
        assumed = podiam.sts.assume_role_calls()
        running = [asyncio.create_task(pod.hammer(CREDS + pod.role, outage + 2)) for pod in pods]
        await asyncio.sleep(1.0)
        for server in podiam.servers:
            await server.kill()
        await asyncio.sleep(outage / 2)
        newcomer = podiam.add_pod(0, "apps", "newcomer", "app-newcomer")
        refusal, refusal_seconds = await newcomer.hammer(CREDS, 0.0)
        await asyncio.sleep(max(0.0, outage / 2 - 1.0))
        await asyncio.gather(*(server.start() for server in podiam.servers))
        restart = time.monotonic()
        total, failed, slowest = _failures(await asyncio.gather(*running))
        await _until_streams(pods[0], 2)
        live_again = time.monotonic() - restart
        served_new = time.monotonic()
        for _ in range(200):
            if (await newcomer.fetch(CREDS)).status == 200:
                break
            await asyncio.sleep(0.05)
        new_served = time.monotonic() - served_new
        table.add(
            f"all replicas down {outage:g}s", total, failed,
            podiam.sts.assume_role_calls() - assumed, round(slowest, 3),
            f"new pod refused with {'/'.join(refusal)} in {refusal_seconds * 1000:.0f} ms; "
            f"two streams {live_again:.2f}s after the restart, new pod served "
            f"{new_served:.2f}s after that; the AssumeRole calls are the restarted servers' own "
            "(a new server process fetches what it serves)",
        )  # fmt: skip
        section.check(
            "all replicas down: failed requests (cached pods)", "0", str(failed), failed == 0
        )
        section.check(
            "all replicas down: new pod refused (503, not a hang)",
            "503",
            "/".join(refusal),
            set(refusal) == {"503"},
        )

        # Agent and servers partitioned: the worker's LAN cable pulled (its bridge port down),
        # pods and agent still talking over their veths.
        partition = options.outage_seconds
        port = f"n{podiam.workers[0].index}"
        lan = podiam.cluster.lan_ns
        assumed = podiam.sts.assume_role_calls()
        running = [asyncio.create_task(pod.hammer(CREDS + pod.role, partition + 2)) for pod in pods]
        await asyncio.sleep(1.0)
        lan.run("ip", "link", "set", port, "down")
        try:
            await asyncio.sleep(partition / 2)
            stranger = podiam.add_pod(0, "apps", "stranger", "app-stranger")
            refusal2, refusal2_seconds = await stranger.hammer(CREDS, 0.0)
            believed = await _streams_live(pods[0], pods[0].node)
            await asyncio.sleep(max(0.0, partition / 2 - 1.0))
        finally:
            lan.run("ip", "link", "set", port, "up")
        healed = time.monotonic()
        total, failed, slowest = _failures(await asyncio.gather(*running))
        await _until_streams(pods[0], 2)
        back = time.monotonic() - healed
        table.add(
            f"agent-server partition {partition:g}s (link down)", total, failed,
            podiam.sts.assume_role_calls() - assumed, round(slowest, 3),
            f"new pod answered {'/'.join(refusal2)} in {refusal2_seconds * 1000:.0f} ms "
            f"({believed} stream(s) still believed live then); two streams "
            f"{back:.2f}s after the heal",
        )  # fmt: skip
        section.check("partition: failed requests (cached pods)", "0", str(failed), failed == 0)


# ---- IP reuse churn, on loopback ----------------------------------------------------------------


async def _churn(section: Section, options) -> None:
    from tests.support.agent import NODE, pod_session, running_agent
    from tests.support.kubeapi import KubeApiServer
    from tests.support.moto_sts import MotoSts
    from tests.support.server import running_server
    from tests.support.tls import make_tls_dirs

    replacements, pool = options.churn_replacements, options.churn_ips
    namespaces = ["churn-a", "churn-b", "churn-c"]
    roles = [f"churn-role-{k}" for k in range(5)]
    work = Path(tempfile.mkdtemp(prefix="podiam-faults-"))
    kube, sts = KubeApiServer(), MotoSts()
    await kube.start()
    await asyncio.to_thread(sts.start)
    try:
        for namespace in namespaces:
            kube.add_namespace(namespace, annotations={"iam.amazonaws.com/permitted": ".*"})
        tls = make_tls_dirs(work / "tls")
        async with running_server(kube, sts, tls, work) as served:
            registry = served.server.registry
            async with running_agent(
                server_port=served.server.port, tls=tls, metadata="http://127.0.0.1:9"
            ) as agent:
                await asyncio.wait_for(agent.streams.synced_once.wait(), 15)
                windows: list[float] = []
                # Every answer (IP, sent, answered, role or ""), and per IP every pod it was
                # given to: [role, added to the API, server dropped it, agent dropped it].
                answers: list[tuple[str, float, float, str]] = []
                held: dict[str, list[list]] = {}
                handovers = 0

                def spec(k: int) -> tuple[str, str, str]:
                    return namespaces[k % 3], f"p{k}", roles[k % len(roles)]

                def add(namespace: str, name: str, role: str, ip: str) -> None:
                    annotations = {"iam.amazonaws.com/role": role,
                                   "iam.amazonaws.com/session-name": role}  # fmt: skip
                    kube.add_pod(namespace, name, ip=ip, host_ip=NODE, annotations=annotations)
                    held.setdefault(ip, []).append([role, time.monotonic(), _NEVER, _NEVER])

                async def one_ip(index: int, count: int) -> None:
                    nonlocal handovers
                    ip = f"127.0.{200 + index // 250}.{index % 250 + 1}"
                    stop = asyncio.Event()

                    async def ask() -> None:
                        async with pod_session(ip) as http:
                            while not stop.is_set():
                                started = time.monotonic()
                                async with http.get(f"http://{NODE}:{agent.port}{CREDS}") as r:
                                    body = await r.text()
                                answered = time.monotonic()
                                answers.append(
                                    (ip, started, answered, body if r.status == 200 else "")
                                )

                    k = index
                    namespace, name, role = spec(k)
                    add(namespace, name, role, ip)
                    askers = [asyncio.create_task(ask()) for _ in range(2)]
                    await _until(lambda r=role: _role_at(agent, ip) == r)
                    for _ in range(count):
                        await asyncio.sleep(0.02)  # the holder asks a few times
                        kube.delete_pod(namespace, name)
                        await _until(lambda: registry.lookup(ip).pod is None)
                        at_server = time.monotonic()
                        await _until(lambda r=role: _role_at(agent, ip) != r)
                        at_agent = time.monotonic()
                        held[ip][-1][2:] = [at_server, at_agent]
                        windows.append(at_agent - at_server)
                        old = role
                        k += pool
                        namespace, name, role = spec(k)
                        if role == old:
                            role = roles[(roles.index(role) + 1) % len(roles)]
                        add(namespace, name, role, ip)
                        await _until(lambda r=role: _role_at(agent, ip) == r)
                        handovers += 1
                    stop.set()
                    await asyncio.gather(*askers, return_exceptions=True)

                per_ip = [
                    replacements // pool + (1 if i < replacements % pool else 0)
                    for i in range(pool)
                ]
                started = time.monotonic()
                await asyncio.gather(*(one_ip(i, n) for i, n in enumerate(per_ip) if n))
                elapsed = time.monotonic() - started
        # An answer is decided somewhere between its request and its answer. It is right for
        # the server if, at some moment of that span, a pod with that role held the IP as the
        # server knew it (from its addition until the server dropped it); else it came after
        # that pod's deletion reached the server. Likewise for the agent's state. (Judging an
        # answer by when it was asked misread a request that waited for its pod through
        # several hand-overs and was answered, rightly, for a later pod with the same role.)
        after_server = after_agent = 0
        for ip, asked, answered, body in answers:
            if not body:
                continue
            pods = [pod for pod in held[ip] if pod[0] == body]
            after_server += not any(p[1] <= answered and asked <= p[2] for p in pods)
            after_agent += not any(p[1] <= answered and asked <= p[3] for p in pods)
        generation = handovers
    finally:
        await asyncio.to_thread(sts.stop)
        await kube.stop()
    windows.sort()
    table = section.table(
        "IP reuse churn (loopback; each IP asked continuously by its current holder)",
        ["replacements", "IPs", "answers", "old role after the agent saw the deletion",
         "old role after the server saw it", "stale window p50 ms", "p99 ms", "max ms", "s"],
    )  # fmt: skip
    table.add(
        generation, pool, len(answers), after_agent, after_server,
        round(percentile(windows, 0.5) * 1000, 2), round(percentile(windows, 0.99) * 1000, 2),
        round((windows[-1] if windows else 0) * 1000, 2), round(elapsed, 1),
    )  # fmt: skip
    section.notes.append(
        "stale window: from the server's registry dropping the deleted pod to the agent no "
        "longer answering with its role (the node stream's latency). An answer counts against "
        "the server (or the agent) only if no pod with that role held the IP, as the server (or "
        "the agent) knew it, at any moment between the request and its answer. Loopback has no "
        "per-pod host routes, so the answers after the server saw a deletion are those of the "
        "stream's latency, given to the deleted pod's own IP before any other pod holds it. On "
        "a node the pod's veth goes when its sandbox is torn down, and the route evidence "
        "drops the entry then, normally before the deletion reaches the API and the server "
        "(tests/test_netns_stable.py)"
    )
    section.check(
        "churn: old role served after the deletion reached the agent",
        "0",
        str(after_agent),
        after_agent == 0,
    )
    section.check(
        "churn: old role served after the deletion reached the server",
        "0",
        str(after_server),
        after_server == 0,
    )


_NEVER = float("inf")


def _role_at(agent, ip: str) -> str | None:
    entry = agent.state.usable_entry(ip)
    return entry.role if entry is not None else None


async def _until(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError("condition not met in time")
        await asyncio.sleep(0.0005)
