"""The fault suite's Kubernetes API faults: the API server down for a while, then a burst of
dropped watches and 410 Gone answers, while pods come, go and change role.

Loopback, with the Kubernetes API test double (tests/support/kubeapi.py), an in-process server
and agent, so that the server's index can be compared with the API's truth directly. Pods whose
API objects never change are asked for their role throughout: every answer must be theirs
(failures and wrong roles, target 0). Other pods are deleted, replaced under their IP and
re-annotated while the API is down (its history is then compacted, so the server's watch must
re-list: 410) and while watches are dropped and expired in a burst. Afterwards the server's
index and every answer the agent gives must match the API exactly.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from pathlib import Path

CREDS = "/latest/meta-data/iam/security-credentials/"
STABLE_NS, CHANGING_NS = "kube-stable", "kube-changing"
# The changing namespace permits kb-* roles only: a pod re-annotated with another is refused.
CHANGING_PERMITTED = "kb-.*"
BURST_ROUNDS = 20


class _Truth:
    """What the API says each changing IP holds: (namespace, name, role) or None."""

    def __init__(self, kube, node: str) -> None:
        self.kube = kube
        self.node = node
        self.at: dict[str, tuple[str, str, str] | None] = {}
        self.serial = 0
        self.changes = 0

    def add(self, ip: str, role: str) -> None:
        self.serial += 1
        name = f"kc-{self.serial}"
        annotations = {"iam.amazonaws.com/role": role, "iam.amazonaws.com/session-name": role}
        self.kube.add_pod(CHANGING_NS, name, ip=ip, host_ip=self.node, annotations=annotations)
        self.at[ip] = (CHANGING_NS, name, role)

    def change_one(self, rng: random.Random) -> None:
        ip = rng.choice(sorted(self.at))
        held = self.at[ip]
        self.changes += 1
        role = rng.choice(["kb-role-1", "kb-role-2", "kb-role-3", "forbidden-role"])
        if held is None:
            self.add(ip, role)
            return
        namespace, name, old = held
        action = rng.choice(["delete", "replace", "reannotate"])
        if action == "reannotate":
            if role == old:
                role = "kb-role-4"
            annotations = {"iam.amazonaws.com/role": role, "iam.amazonaws.com/session-name": role}
            self.kube.update_pod(namespace, name, annotations=annotations)
            self.at[ip] = (namespace, name, role)
            return
        self.kube.delete_pod(namespace, name)
        self.at[ip] = None
        if action == "replace":
            self.add(ip, role)

    def expected(self, ip: str) -> tuple[int, str]:
        held = self.at[ip]
        if held is None:
            return 404, ""
        role = held[2]
        return (200, role) if role.startswith("kb-") else (403, "")


def _index_mismatches(registry, truth: _Truth) -> list[str]:
    wrong = []
    for ip, held in truth.at.items():
        pod = registry.lookup(ip).pod
        if held is None:
            if pod is not None:
                wrong.append(f"{ip}: server holds {pod.name}, the API none")
        elif pod is None or (pod.namespace, pod.name, pod.role) != held:
            got = None if pod is None else (pod.namespace, pod.name, pod.role)
            wrong.append(f"{ip}: server holds {got}, the API {held}")
    return wrong


async def _agent_mismatches(agent_port: int, node: str, truth: _Truth) -> list[str]:
    from tests.support.agent import pod_session

    async def one(ip: str) -> str | None:
        async with pod_session(ip) as http:
            for _ in range(3):
                async with http.get(f"http://{node}:{agent_port}{CREDS}") as response:
                    body = await response.text()
                # A 504/503 is no answer rather than a wrong one (on a loaded machine the
                # server may not answer a unary call within what --pod-wait leaves): ask again.
                if response.status < 500:
                    break
                await asyncio.sleep(0.2)
        status, role = truth.expected(ip)
        if response.status != status or (status == 200 and body != role):
            return f"{ip}: agent answered {response.status} {body[:40]!r}, expected {status} {role}"
        return None

    answers = await asyncio.gather(*(one(ip) for ip in truth.at))
    return [a for a in answers if a is not None]


async def run(section, options) -> None:
    from tests.support.agent import NODE, pod_session, running_agent
    from tests.support.kubeapi import KubeApiServer
    from tests.support.moto_sts import MotoSts
    from tests.support.server import running_server
    from tests.support.tls import make_tls_dirs

    rng = random.Random(9)
    stable_count = options.kube_pods // 2
    changing_count = options.kube_pods - stable_count
    outage = options.kube_outage_seconds
    work = Path(tempfile.mkdtemp(prefix="podiam-faults-kube-"))
    kube, sts = KubeApiServer(), MotoSts()
    await kube.start()
    await asyncio.to_thread(sts.start)
    stable = [(f"127.0.212.{k + 1}", f"stable-role-{k % 5}") for k in range(stable_count)]
    truth = _Truth(kube, NODE)
    try:
        kube.add_namespace(STABLE_NS, annotations={"iam.amazonaws.com/permitted": ".*"})
        kube.add_namespace(
            CHANGING_NS, annotations={"iam.amazonaws.com/permitted": CHANGING_PERMITTED}
        )
        for k, (ip, role) in enumerate(stable):
            kube.add_pod(STABLE_NS, f"ks-{k}", ip=ip, host_ip=NODE,
                         annotations={"iam.amazonaws.com/role": role})  # fmt: skip
        for k in range(changing_count):
            truth.add(f"127.0.213.{k + 1}", f"kb-role-{k % 3 + 1}")
        tls = make_tls_dirs(work / "tls")
        async with running_server(kube, sts, tls, work) as served:
            registry = served.server.registry
            async with running_agent(
                server_port=served.server.port, tls=tls, metadata="http://127.0.0.1:9"
            ) as agent:
                await asyncio.wait_for(agent.streams.synced_once.wait(), 15)
                counts = {"requests": 0, "failed": 0, "wrong": 0}
                stop = asyncio.Event()

                async def ask(ip: str, role: str) -> None:
                    async with pod_session(ip) as http:
                        while not stop.is_set():
                            async with http.get(f"http://{NODE}:{agent.port}{CREDS}") as r:
                                body = await r.text()
                            counts["requests"] += 1
                            counts["failed"] += r.status != 200
                            counts["wrong"] += r.status == 200 and body != role
                            await asyncio.sleep(0.01)

                deadline = time.monotonic() + 30
                while _index_mismatches(registry, truth) or any(
                    registry.lookup(ip).pod is None for ip, _ in stable
                ):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the server did not index the pods in 30 s")
                    await asyncio.sleep(0.05)
                askers = [asyncio.create_task(ask(ip, role)) for ip, role in stable]
                lists_before = kube.list_requests["pods"]
                watches_before = kube.watch_requests["pods"]

                # 1. The API server goes away; pods change meanwhile; its history is compacted
                # before it comes back, so the server's watch cannot resume: 410, re-list.
                await kube.stop()
                outage_started = time.monotonic()
                changes_before = truth.changes
                while time.monotonic() - outage_started < outage:
                    truth.change_one(rng)
                    await asyncio.sleep(0.2)
                outage_changes = truth.changes - changes_before
                kube.compact()
                await kube.start()
                back = time.monotonic()
                while _index_mismatches(registry, truth):
                    if time.monotonic() - back > 120:
                        raise RuntimeError("the server's index was not exact 120 s after the API")
                    await asyncio.sleep(0.02)
                exact_after_outage = time.monotonic() - back

                # 2. A burst of broken watches: dropped without a word, or ended with 410 Gone
                # after a compaction, while pods keep changing.
                changes_before = truth.changes
                for round_ in range(BURST_ROUNDS):
                    for _ in range(3):
                        truth.change_one(rng)
                    if round_ % 2:
                        kube.compact()
                        kube.expire_watches()
                    else:
                        kube.drop_watches()
                    await asyncio.sleep(rng.uniform(0.05, 0.3))
                burst_changes = truth.changes - changes_before
                burst_end = time.monotonic()
                while _index_mismatches(registry, truth):
                    if time.monotonic() - burst_end > 120:
                        raise RuntimeError("the server's index was not exact 120 s after the burst")
                    await asyncio.sleep(0.02)
                exact_after_burst = time.monotonic() - burst_end
                await asyncio.sleep(0.5)  # the node stream carries the last changes
                agent_wrong = await _agent_mismatches(agent.port, NODE, truth)
                index_wrong = _index_mismatches(registry, truth)
                stop.set()
                await asyncio.gather(*askers, return_exceptions=True)
                relists = kube.list_requests["pods"] - lists_before
                watches = kube.watch_requests["pods"] - watches_before
    finally:
        await asyncio.to_thread(sts.stop)
        await kube.stop()
    table = section.table(
        f"Kubernetes API faults (loopback): {stable_count} unchanging pods asked throughout, "
        f"{changing_count} IPs whose pods change",
        ["fault", "changes meanwhile", "s until the server's index is exact",
         "requests from unchanging pods", "failed", "wrong role"],
    )  # fmt: skip
    table.add(f"API server down {outage:g} s, history compacted", outage_changes,
              round(exact_after_outage, 2), "", "", "")  # fmt: skip
    table.add(f"{BURST_ROUNDS} watch breaks (dropped, or 410 after compaction) in "
              f"{burst_end - back - exact_after_outage:.1f} s", burst_changes,
              round(exact_after_burst, 2), counts["requests"], counts["failed"],
              counts["wrong"])  # fmt: skip
    section.notes.append(
        f"Kubernetes API faults: {relists} pod re-lists and {watches} pod watches over both "
        "faults; afterwards the server's index compared with the API for every changing IP "
        f"({len(index_wrong)} differ) and each IP asked through the agent "
        f"({len(agent_wrong)} answers differ from the API: role, 403 for a role the namespace "
        "does not permit, 404 for no pod)" + (f": {agent_wrong[:3]}" if agent_wrong else "")
    )
    section.check("Kubernetes API faults: failed or wrong answers for unchanging pods", "0",
                  f"{counts['failed']} failed, {counts['wrong']} wrong",
                  counts["failed"] == 0 and counts["wrong"] == 0)  # fmt: skip
    section.check(
        "Kubernetes API faults: index and answers exact afterwards",
        "0 differences",
        f"{len(index_wrong)} in the index, {len(agent_wrong)} in answers",
        not index_wrong and not agent_wrong,
    )
    section.data["kube"] = {
        "outage_changes": outage_changes,
        "burst_changes": burst_changes,
        "exact_after_outage": exact_after_outage,
        "exact_after_burst": exact_after_burst,
        **counts,
        "relists": relists,
        "watches": watches,
        "index_wrong": index_wrong,
        "agent_wrong": agent_wrong,
    }
