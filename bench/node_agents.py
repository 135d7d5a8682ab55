"""Simulated agents for the scale bench: ``python -m bench.node_agents`` reads a JSON spec on
stdin — ``{"target", "tls", "host_ips": [...], "channels", "expect", "cpu"}`` — and opens one
WatchNode stream per host IP, as one agent per node does, over ``channels`` mutual-TLS
connections with the agent certificate (thousands of agents' connections would measure this
process's TLS, not the server's fan-out).

It prints JSON lines: ``{"snapshots": ...}`` once every stream has delivered its first message
(the snapshot), with the wall-clock time of the last one, the pods the snapshots held and how
often a stream was refused before its snapshot and tried again (as agents do); then,
once the streams together have delivered ``expect`` pod IPs that no snapshot held,
``{"delivered": ...}`` with the wall-clock time of the last; then it runs until stdin closes.
Wall-clock times, because the process that adds the pods is another one.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import grpc

from bench.nodestreams import AGENT_CHANNEL_OPTIONS
from bench.procs import pin
from certs.tls import TlsFiles, channel_credentials
from protos import kiam_pb2, kiam_pb2_grpc


async def run(spec: dict) -> None:
    credentials = channel_credentials(TlsFiles.agent_in(Path(spec["tls"])))
    channels = [
        # The real agent's channel options (keepalive pings every 5 s), as bench/nodestreams.py.
        grpc.aio.secure_channel(
            spec["target"],
            credentials,
            options=[("grpc.use_local_subchannel_pool", 1), *AGENT_CHANNEL_OPTIONS],
        )
        for _ in range(max(1, int(spec["channels"])))
    ]
    host_ips: list[str] = spec["host_ips"]
    expect = int(spec["expect"])
    snapshot_ips: set[str] = set()
    new_ips: set[str] = set()
    pending = len(host_ips)
    all_snapshots = asyncio.Event()
    all_delivered = asyncio.Event()
    marks: dict[str, float] = {}
    started = time.time()
    messages = [0]
    snapshotted: set[str] = set()
    retries: Counter[str] = Counter()

    async def agent(index: int, host_ip: str) -> None:
        stub = kiam_pb2_grpc.KiamServiceStub(channels[index % len(channels)])
        while True:
            try:
                await stream(stub, host_ip)
                raise RuntimeError(f"the stream for {host_ip} ended")
            except grpc.aio.AioRpcError as error:
                if host_ip in snapshotted:
                    raise
                # Refused before its snapshot (a server swamped by agents arriving at once
                # cancels some calls): retried after a jittered backoff, as an agent does.
                retries[error.code().name] += 1
                await asyncio.sleep(random.uniform(0.5, 2.0))

    async def stream(stub, host_ip: str) -> None:
        nonlocal pending
        async for update in stub.WatchNode(kiam_pb2.WatchNodeRequest(host_ip=host_ip)):
            messages[0] += 1
            ips = {pod.ip for pod in update.pods if pod.ip}
            if host_ip not in snapshotted:
                snapshotted.add(host_ip)
                snapshot_ips.update(ips)
                pending -= 1
                if pending == 0:
                    marks["snapshots"] = time.time()
                    all_snapshots.set()
                continue
            new_ips.update(ips - snapshot_ips)
            if len(new_ips) >= expect and not all_delivered.is_set():
                marks["delivered"] = time.time()
                all_delivered.set()

    tasks = [asyncio.create_task(agent(i, ip)) for i, ip in enumerate(host_ips)]
    watcher = asyncio.gather(*tasks)
    try:
        await _first(all_snapshots.wait(), watcher)
        _say(snapshots=marks["snapshots"], seconds=marks["snapshots"] - started,
             pods=len(snapshot_ips), streams=len(host_ips), retries=dict(retries))  # fmt: skip
        if expect:
            await _first(all_delivered.wait(), watcher)
            _say(delivered=marks["delivered"], pods=len(new_ips), messages=messages[0])
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)  # until the bench closes stdin
    finally:
        watcher.cancel()
        for channel in channels:
            await channel.close()


async def _first(event_wait, watcher: asyncio.Future) -> None:
    """Wait for ``event_wait``; a stream that ended first (server gone, refused) is an error."""
    waiting = asyncio.ensure_future(event_wait)
    done, _ = await asyncio.wait({waiting, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if waiting not in done:
        waiting.cancel()
        watcher.result()
        raise RuntimeError("a node stream ended")


def _say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def main() -> None:
    spec = json.loads(sys.stdin.readline())
    pin(spec.get("cpu"))
    asyncio.run(run(spec))


if __name__ == "__main__":
    main()
