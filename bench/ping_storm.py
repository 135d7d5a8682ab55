"""Keepalive pings through a connect storm, reduced to its parts: which side answers late?

The scale bench's simulated agents lose tens of their 5,000 streams to ``ping timeout`` while
the streams connect. This puts the same pieces together without podiam's index: a grpc.aio
server with podiam-server's keepalive and connection options and its certificate handling, a
WatchNode handler that builds a node-sized snapshot per stream (the loop's work in a storm), and
simulated agents with the agent's channel options, all opening their streams at once.

    python -m bench.ping_storm --streams 5000 --processes 4 --seconds 30 [--trace]

Prints one JSON line: the streams that ended after their snapshot, with cause and seconds since
the start. ``--trace`` runs every process with ``GRPC_TRACE=http2_ping,http_keepalive`` and
follows each ping by its id: the agent queueing and writing it, the server reading it and
writing its ACK, the agent reading the ACK. A ping that times out with the server reading it
late is the server's; one whose ACK the server wrote in time is the agent's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import grpc

from agent.client import CHANNEL_OPTIONS
from bench import procs
from certs.authority import generate_bundle, write_bundle
from certs.tls import TlsFiles, channel_credentials, server_credentials
from protos import kiam_pb2, kiam_pb2_grpc
from server.app import CONNECT_STORM_OPTIONS, MEMORY_PER_CONNECTION_OPTIONS

# podiam-server's keepalive options (server/app.py _serve).
SERVER_OPTIONS = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 4_000),
    ("grpc.http2.max_pings_without_data", 0),
    *CONNECT_STORM_OPTIONS,
    *MEMORY_PER_CONNECTION_OPTIONS,
)
ROLES = 50


class _Snapshots(kiam_pb2_grpc.KiamServiceServicer):
    """A snapshot of ``pods`` pods and their credentials, built for every stream."""

    def __init__(self, pods: int) -> None:
        self._pods = pods

    async def WatchNode(self, request, context):
        arn = "arn:aws:iam::123456789012:role/app-"
        pods = [
            kiam_pb2.PodState(
                ip=f"10.2.{k // 250}.{k % 250}",
                role=f"app-{k % ROLES}",
                identity=f"{arn}{k % ROLES}|s|",
                role_arn=f"{arn}{k % ROLES}",
                uid=f"{k:032d}",
            )
            for k in range(self._pods)
        ]
        credentials = kiam_pb2.Credentials(
            code="Success",
            type="AWS-HMAC",
            access_key_id="ASIA" + "X" * 16,
            secret_access_key="s" * 40,
            token="t" * 700,
            expiration="2026-12-02T07:00:00Z",
            last_updated="2026-12-02T06:00:00Z",
        )
        held = [
            kiam_pb2.IdentityCredentials(identity=f"{arn}{k}|s|", credentials=credentials)
            for k in range(min(self._pods, ROLES))
        ]
        yield kiam_pb2.NodeUpdate(reset=True, synced=True, pods=pods, credentials=held)
        await asyncio.Event().wait()


async def _serve(args) -> None:
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    server = grpc.aio.server(options=list(SERVER_OPTIONS))
    kiam_pb2_grpc.add_KiamServiceServicer_to_server(_Snapshots(args.snapshot_pods), server)
    files = TlsFiles.server_in(args.tls)
    port = server.add_secure_port(
        "127.0.0.1:0", server_credentials(files, reload=not args.fixed_credentials)
    )
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


async def _agents(args) -> None:
    credentials = channel_credentials(TlsFiles.agent_in(args.tls))
    lost: list[tuple[float, str]] = []
    started = args.started

    async def agent(n: int) -> None:
        channel = grpc.aio.secure_channel(
            f"localhost:{args.port}",
            credentials,
            options=[("podiam.bench.agent", f"{os.getpid()}/{n}"), *CHANNEL_OPTIONS],
        )
        stub = kiam_pb2_grpc.KiamServiceStub(channel)
        while True:
            synced = False
            try:
                async for _ in stub.WatchNode(kiam_pb2.WatchNodeRequest(host_ip="10.0.0.1")):
                    synced = True
            except grpc.aio.AioRpcError as error:
                if synced:
                    lost.append((round(time.time() - started, 2), error.details()))
            await asyncio.sleep(0.5)

    tasks = [asyncio.ensure_future(agent(n)) for n in range(args.streams)]
    await asyncio.sleep(max(0.0, started + args.seconds - time.time()))
    print(json.dumps(lost), flush=True)
    for task in tasks:
        task.cancel()
    os._exit(0)  # 1,000 channels closing one by one says nothing


def _storm(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="podiam-ping-storm-"))
    write_bundle(generate_bundle(), work / "tls")
    env = procs.env(
        **(
            {"GRPC_TRACE": "http2_ping,http_keepalive", "GRPC_VERBOSITY": "debug"}
            if args.trace
            else {}
        )
    )
    me = [sys.executable, "-m", "bench.ping_storm"]
    common = ["--tls", str(work / "tls"), "--snapshot-pods", str(args.snapshot_pods)]
    flags = [
        *(["--fixed-credentials"] if args.fixed_credentials else []),
        *(["--switch-interval", str(args.switch_interval)] if args.switch_interval else []),
    ]
    with open(work / "server.log", "w") as server_log:
        server = subprocess.Popen(
            [*_pinned(procs.SERVED_CPU), *me, "serve", *common, *flags],
            stdout=subprocess.PIPE,
            stderr=server_log,
            env=env,
            cwd=procs.REPO,
            text=True,
        )
    try:
        port = int(server.stdout.readline())
        started = time.time() + 1.0
        share = -(-args.streams // args.processes)
        agents = []
        for k in range(args.processes):
            with open(work / f"agents{k}.log", "w") as log:
                agents.append(
                    subprocess.Popen(
                        [
                            *_pinned(procs.LOAD_CPU),
                            *me,
                            "agents",
                            *common,
                            "--port",
                            str(port),
                            "--started",
                            str(started),
                            "--streams",
                            str(min(share, args.streams - k * share)),
                            "--seconds",
                            str(args.seconds),
                        ],
                        stdout=subprocess.PIPE,
                        stderr=log,
                        env=env,
                        cwd=procs.REPO,
                        text=True,
                    )
                )
        lost = [tuple(x) for a in agents for x in json.loads(a.communicate()[0] or "[]")]
    finally:
        server.terminate()
        server.wait()
    result = {
        "streams": args.streams,
        "processes": args.processes,
        "lost": len(lost),
        "causes": dict(Counter(cause for _, cause in lost)),
        "seconds": sorted(at for at, _ in lost),
        "load": os.getloadavg(),
        "switch_interval": args.switch_interval or sys.getswitchinterval(),
        "credentials": "fixed" if args.fixed_credentials else "reloading (as podiam-server)",
    }
    if args.trace:
        result["pings"] = trace_pings(
            [work / "server.log", *(work / f"agents{k}.log" for k in range(args.processes))]
        )
    return result


def _pinned(which: int) -> list[str]:
    core = procs.cpu(which)
    return [] if core is None else ["taskset", "-c", str(core)]


_LINE = re.compile(
    r"^[IWED](\d{4} \d\d:\d\d:\d\d\.\d+)\s+\d+ \S+\] (CLIENT|SERVER)\[(\w+)\]: (.*)$"
)


def trace_pings(paths: list[Path]) -> dict:
    """Each agent keepalive ping by id: queued → written (agent), read → ACK written (server),
    ACK read (agent); the legs' percentiles, and for the pings never answered, where they
    waited."""
    year = datetime.now().year
    sent, written, read, answered, acked = {}, {}, {}, {}, {}
    to_write: dict[str, list[str]] = {}
    to_answer: dict[str, list[str]] = {}
    for path in paths:
        for line in path.open(errors="replace"):
            match = _LINE.match(line)
            if match is None:
                continue
            stamp, side, transport, text = match.groups()
            at = datetime.strptime(f"{year}{stamp}", "%Y%m%d %H:%M:%S.%f").timestamp()
            if side == "CLIENT":
                if found := re.match(r"Ping (\d+) sent", text):
                    sent[found[1]] = at
                    to_write.setdefault(transport, []).append(found[1])
                elif text.startswith("Finish write"):
                    for ping in to_write.pop(transport, ()):
                        written[ping] = at
                elif found := re.match(r"received ping ack (\d+)", text):
                    acked[found[1]] = at
            elif found := re.match(r"received ping (\d+)(:|$)", text):
                read[found[1]] = at
                to_answer.setdefault(transport, []).append(found[1])
            elif text.startswith("Write "):
                for ping in to_answer.pop(transport, ()):
                    answered[ping] = at
    legs = {
        "agent: queued to written": (sent, written),
        "server: written to read": (written, read),
        "server: read to ACK written": (read, answered),
        "agent: ACK written to read": (answered, acked),
    }
    last = max(sent.values(), default=0.0)
    unanswered = [p for p, at in sent.items() if p not in acked and at < last - 3]
    summary: dict = {"pings": len(sent), "timed out": len(unanswered)}
    for name, (start, end) in legs.items():
        waits = sorted(end[p] - start[p] for p in start if p in end)
        summary[name] = {
            "p99_ms": round(procs.percentile(waits, 0.99) * 1000, 1),
            "max_ms": round(waits[-1] * 1000, 1) if waits else None,
            "timed out, s": sorted(
                round(end[p] - start[p], 3) for p in unanswered if p in start and p in end
            ),
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", nargs="?", choices=["storm", "serve", "agents"], default="storm")
    parser.add_argument("--streams", type=int, default=5000)
    parser.add_argument("--processes", type=int, default=4, help="agent processes")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--snapshot-pods", type=int, default=110)
    parser.add_argument(
        "--fixed-credentials",
        action="store_true",
        help="server TLS without podiam-server's per-handshake reload check",
    )
    parser.add_argument(
        "--switch-interval", type=float, default=0.0, help="the server's sys.setswitchinterval (s)"
    )
    parser.add_argument("--trace", action="store_true")
    parser.add_argument("--tls", type=Path)
    parser.add_argument("--port", type=int)
    parser.add_argument("--started", type=float)
    args = parser.parse_args()
    if args.role == "serve":
        asyncio.run(_serve(args))
    elif args.role == "agents":
        procs.raise_open_files_limit()
        asyncio.run(_agents(args))
    else:
        print(json.dumps(_storm(args)), flush=True)


if __name__ == "__main__":
    main()
