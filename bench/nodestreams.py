"""Simulated agents: one WatchNode stream per node, all from one process, as 5,000 agents would
hold them (the server runs with --no-node-binding, so one process may stand in for every node).

    python -m bench.nodestreams        # a JSON spec on stdin's first line, then commands

Spec: ``{"target", "tls", "hosts": [host_ip, ...], "channels", "cpu"}``. Prints
``ready {"seconds"}`` once every stream has its snapshot, then takes commands, one a line:

    watch <first> <count> <nodes>   pods first..first+count-1 of bench/kubeproc.py are about
                                    to be added: print ``watching``, wait until each has
                                    reached its own node's stream, and print ``watched
                                    {"seconds", "delivered", "misrouted", "updates"}`` —
                                    misrouted counts pod states that reached another node's
                                    stream (there must be none)
    quit

The time runs from reading the command to the last pod's arrival, so it includes the API
server creating the pods and sending the events, the server applying them, and the fan-out.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import grpc

from bench import kubeproc
from bench.procs import pin
from certs.tls import TlsFiles, channel_credentials
from protos import kiam_pb2, kiam_pb2_grpc


class Streams:
    def __init__(self, hosts: list[str]) -> None:
        self.hosts = hosts
        self.snapshots = 0
        self.failed: list[str] = []  # streams that ended with an error, and why
        self.live: set[str] = set()  # hosts whose stream has its snapshot and goes on
        self.all_snapshots = asyncio.Event()
        # While a watch command runs: the IPs expected, on which host, and what arrived.
        self.expected: dict[str, str] = {}
        self.delivered = 0
        self.misrouted = 0
        self.updates = 0
        self.done = asyncio.Event()

    async def follow(self, stub: kiam_pb2_grpc.KiamServiceStub, host: str) -> None:
        try:
            await self._follow(stub, host)
        except grpc.aio.AioRpcError as error:
            self.failed.append(f"{host}: {error.code().name} {error.details()}")
        else:
            self.failed.append(f"{host}: the stream ended")
        self.live.discard(host)
        if self.snapshots + len(self.failed) >= len(self.hosts):
            self.all_snapshots.set()

    async def _follow(self, stub: kiam_pb2_grpc.KiamServiceStub, host: str) -> None:
        call = stub.WatchNode(kiam_pb2.WatchNodeRequest(host_ip=host))
        first = True
        async for update in call:
            if first:
                first = False
                self.snapshots += 1
                self.live.add(host)
                if self.snapshots + len(self.failed) >= len(self.hosts):
                    self.all_snapshots.set()
                continue
            self.updates += 1
            for state in update.pods:
                want = self.expected.pop(state.ip, None)
                if want is None:
                    continue
                if want != host:
                    self.misrouted += 1
                self.delivered += 1
            if self.expected == {} and self.delivered:
                self.done.set()


async def run(spec: dict) -> None:
    credentials = channel_credentials(TlsFiles.agent_in(Path(spec["tls"])))
    hosts: list[str] = spec["hosts"]
    # Each channel its own connection (distinct arguments: gRPC would share one otherwise).
    channels = [
        grpc.aio.secure_channel(spec["target"], credentials, options=[("podiam.bench.agent", n)])
        for n in range(max(1, int(spec.get("channels", 10))))
    ]
    streams = Streams(hosts)
    started = time.perf_counter()
    tasks = [
        asyncio.create_task(
            streams.follow(kiam_pb2_grpc.KiamServiceStub(channels[n % len(channels)]), host)
        )
        for n, host in enumerate(hosts)
    ]
    await streams.all_snapshots.wait()
    ready = {"seconds": time.perf_counter() - started, "failed": len(streams.failed)}
    ready["first_failures"] = streams.failed[:3]
    print("ready " + json.dumps(ready), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        command = line.decode().split()
        if command[:1] == ["watch"]:
            first, count, nodes = (int(word) for word in command[1:4])
            started = time.perf_counter()
            # Only pods on nodes whose stream is live can arrive (see "failed" in ready).
            expected = {
                kubeproc.pod_ip(k): kubeproc.node_ip(k % nodes) for k in range(first, first + count)
            }
            streams.expected = {ip: h for ip, h in expected.items() if h in streams.live}
            streams.delivered = streams.misrouted = streams.updates = 0
            streams.done.clear()
            print("watching", flush=True)  # the caller adds the pods only now
            try:
                await asyncio.wait_for(streams.done.wait(), 300)
            except TimeoutError:
                pass  # reported as fewer delivered than asked for
            result = {
                "seconds": time.perf_counter() - started,
                "delivered": streams.delivered,
                "misrouted": streams.misrouted,
                "updates": streams.updates,
            }
            print("watched " + json.dumps(result), flush=True)
        elif command[:1] == ["quit"]:
            break
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close()


def main() -> None:
    spec = json.loads(sys.stdin.readline())
    pin(spec.get("cpu"))
    asyncio.run(run(spec))


if __name__ == "__main__":
    main()
