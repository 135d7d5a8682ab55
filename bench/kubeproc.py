"""The Kubernetes API test server (``tests/support/kubeapi.py``) as its own process, loaded with a
synthetic cluster, so that the podiam-server process measured beside it is alone in its memory.

    python -m bench.kubeproc --pods N --kubeconfig PATH [--nodes K --roles R --local-pods L]

prints ``ready <url>`` once loaded, then takes commands on stdin: ``add <k>`` adds k more pods
(the watch events whose processing rate is measured) and answers ``added <k> <seconds>``;
``remove <k>`` deletes the k pods added last and answers ``removed <k> <seconds>``, so the next
server measured lists the same cluster.

Layout: pods spread over 100 namespaces (all permitting every role) and K nodes (host IPs
10.1.x.y); the first L pods run on node 127.0.0.1, where the benchmark's gRPC client connects
from, so node binding lets it ask for them. Pod k has role ``app-<k mod R>`` and the shared
session-name annotation ``app-<k mod R>``: R role identities in all.
"""

from __future__ import annotations

import argparse
import asyncio
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


async def serve(args: argparse.Namespace) -> None:
    async with KubeApiServer() as kube:
        for n in range(NAMESPACES):
            kube.add_namespace(f"ns-{n}", annotations={"iam.amazonaws.com/permitted": ".*"})
        added = kube.add_pods(
            specs(0, args.pods, nodes=args.nodes, roles=args.roles, local=args.local_pods)
        )
        kube.write_kubeconfig(args.kubeconfig)
        print(f"ready {kube.url}", flush=True)
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
                count = min(int(command[1]), added - args.pods)
                started = time.perf_counter()
                for k in range(added - count, added):
                    kube.delete_pod(f"ns-{k % NAMESPACES}", f"pod-{k}")
                added -= count
                print(f"removed {count} {time.perf_counter() - started:.3f}", flush=True)
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
