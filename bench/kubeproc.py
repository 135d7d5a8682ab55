"""The Kubernetes API test server (``tests/support/kubeapi.py``) as its own process, loaded with a
synthetic cluster, so that the podiam-server process measured beside it is alone in its memory.

    python -m bench.kubeproc --pods N --kubeconfig PATH [--nodes K --roles R --local-pods L]

prints ``ready <url>`` once loaded, then takes commands on stdin: ``add <k>`` adds k more pods
(the watch events whose processing rate is measured) and answers ``added <k> <seconds>``;
``remove <k>`` deletes the k pods added last and answers ``removed <k> <seconds>``, so the next
server measured lists the same cluster; ``rollout <k> <wave>`` replaces the k pods added first
(and still there) with k new ones, as a rollout does, and answers ``rolled {"count", "events",
"seconds", "waves"}`` (see ``rollout``). Once no added pod is left, numbering starts over, so
that every server measured is sent the same pods.

Layout: pods spread over 100 namespaces (all permitting every role) and K nodes (host IPs
10.1.x.y); the first L pods run on node 127.0.0.1, where the benchmark's gRPC client connects
from, so node binding lets it ask for them. Pod k has role ``app-<k mod R>`` and the shared
session-name annotation ``app-<k mod R>``: R role identities in all.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time

from bench.procs import pin
from tests.support.kubeapi import KubeApiServer

NAMESPACES = 100
LOCAL_NODE = "127.0.0.1"


def pod_ip(k: int) -> str:
    return f"10.{64 + k // 65536}.{(k // 256) % 256}.{k % 256}"


def node_ip(n: int) -> str:
    return f"10.1.{n // 250}.{n % 250 + 1}"


def specs(start: int, count: int, *, nodes: int, roles: int, local: int):
    for k in range(start, start + count):
        role = f"app-{k % roles}"
        node = k % nodes
        yield {
            "namespace": f"ns-{k % NAMESPACES}",
            "name": f"pod-{k}",
            "ip": pod_ip(k),
            "host_ip": LOCAL_NODE if k < local else node_ip(node),
            "node_name": "local" if k < local else f"node-{node}",
            "annotations": {
                "iam.amazonaws.com/role": role,
                "iam.amazonaws.com/session-name": role,
            },
        }


async def rollout(kube: KubeApiServer, old: range, new: range, *, nodes: int, roles: int,
                  wave: int) -> dict:  # fmt: skip
    """Pods ``old`` replaced by pods ``new``, each through the watch events a Deployment's pod
    produces on a real control plane (tests/support/kubeapi.py, "a pod's life"): created
    Pending, bound, started; the old ones marked for deletion, marked with no grace period,
    deleted. A wave of ``wave`` new pods at a time takes each step together, then as many old
    pods theirs, as a rolling update's surge does; between waves the loop sends what was
    written, so that the watch is fed throughout. ``waves``: for each, when (time.time()) its
    new pods had been started and its old pods deleted, for the delivery times."""
    started, events, waves = time.perf_counter(), kube.store.rv, []
    # No collection over the hundreds of thousands of stored pods between waves (as add_pods).
    gc.disable()
    try:
        for first in range(0, len(new), wave):
            fresh = [_spec(k, nodes=nodes, roles=roles) for k in new[first : first + wave]]
            gone = [(f"ns-{k % NAMESPACES}", f"pod-{k}") for k in old[first : first + wave]]
            kube.add_pods({**spec, "phase": "Pending", "ip": None, "host_ip": None,
                           "node_name": None} for spec in fresh)  # fmt: skip
            for spec in fresh:
                kube.bind_pod(spec["namespace"], spec["name"], spec["node_name"])
            for spec in fresh:
                kube.start_pod(spec["namespace"], spec["name"], ip=spec["ip"],
                               host_ip=spec["host_ip"])  # fmt: skip
            running = time.time()
            for grace in (30, 0):
                for namespace, name in gone:
                    kube.mark_pod_deleted(namespace, name, grace)
            for namespace, name in gone:
                kube.store.remove("pods", (namespace, name))
            waves.append([running, time.time()])
            await asyncio.sleep(0)
    finally:
        gc.enable()
    return {"count": len(new), "events": kube.store.rv - events,
            "seconds": time.perf_counter() - started, "waves": waves}  # fmt: skip


def _spec(k: int, *, nodes: int, roles: int) -> dict:
    return next(specs(k, 1, nodes=nodes, roles=roles, local=0))


async def serve(args: argparse.Namespace) -> None:
    async with KubeApiServer() as kube:
        for n in range(NAMESPACES):
            kube.add_namespace(f"ns-{n}", annotations={"iam.amazonaws.com/permitted": ".*"})
        added = kube.add_pods(
            specs(0, args.pods, nodes=args.nodes, roles=args.roles, local=args.local_pods)
        )
        kube.write_kubeconfig(args.kubeconfig)
        print(f"ready {kube.url}", flush=True)
        first = args.pods  # the first added pod still there (pods first..added-1 are)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            command = line.decode().split()
            if command[:1] == ["add"]:
                count = int(command[1])
                started = time.perf_counter()
                kube.add_pods(specs(added, count, nodes=args.nodes, roles=args.roles, local=0))
                added += count
                print(f"added {count} {time.perf_counter() - started:.3f}", flush=True)
            elif command[:1] == ["remove"]:
                count = min(int(command[1]), added - first)
                started = time.perf_counter()
                for k in range(added - count, added):
                    kube.delete_pod(f"ns-{k % NAMESPACES}", f"pod-{k}")
                added -= count
                if added == first:
                    first = added = args.pods
                print(f"removed {count} {time.perf_counter() - started:.3f}", flush=True)
            elif command[:1] == ["rollout"]:
                count = min(int(command[1]), added - first)
                rolled = await rollout(
                    kube, range(first, first + count), range(added, added + count),
                    nodes=args.nodes, roles=args.roles, wave=int(command[2]),
                )  # fmt: skip
                first, added = first + count, added + count
                print("rolled " + json.dumps(rolled), flush=True)
            elif command[:1] == ["quit"]:
                return


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pods", type=int, required=True)
    parser.add_argument("--nodes", type=int, default=500)
    parser.add_argument("--roles", type=int, default=50)
    parser.add_argument("--local-pods", type=int, default=100)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--cpu", type=int, default=None)
    args = parser.parse_args()
    pin(args.cpu)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
