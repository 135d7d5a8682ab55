"""The HTTP load generator: ``python -m bench.loadgen`` reads a JSON spec on stdin and prints
one JSON result line.

Why not wrk or locust: every request must come from its pod's own source address (the agent
tells pods apart by it), and neither binds many source addresses. This is asyncio on raw
sockets — request bytes built once per pod, responses framed by Content-Length, no HTTP library
— on uvloop when installed, in its own process pinned to the core the server under test does
not use. The benchmark proves it is not the bottleneck by running it against the bare aiohttp
baseline too, which it must drive faster than the agent.

Spec: ``{"port", "host", "targets": [[source_ip, raw_path, {headers}], ...], "requests",
"concurrency", "keepalive", "cpu", "warmup", "start_at"}``. Targets are shared out among the
concurrent workers (worker k takes targets k, k+C, ...), each worker cycling through its own
until the fixed total of requests is reached; with keep-alive each target keeps one connection open.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import Counter

from bench.procs import latency_summary, pin, raise_open_files_limit


class _Exchange(asyncio.Protocol):
    """One connection: send a request, collect one response framed by Content-Length."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[int] | None = None
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError("connection closed mid-response"))

    def request(self, data: bytes) -> asyncio.Future[int]:
        self._buffer.clear()
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self._waiter

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buffer[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        length = int(head[at + 17 : head.find(b"\r\n", at + 2)]) if at >= 0 else 0
        if len(buffer) >= end + 4 + length and self._waiter is not None:
            status = int(head[9:12])
            waiter, self._waiter = self._waiter, None
            buffer.clear()
            waiter.set_result(status)


def _request_bytes(path: str, headers: dict[str, str], *, keepalive: bool) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 169.254.169.254", "User-Agent: podiam-bench"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append("Connection: keep-alive" if keepalive else "Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _connect(host: str, port: int, source: str) -> _Exchange:
    loop = asyncio.get_running_loop()
    _transport, protocol = await loop.create_connection(
        _Exchange, host, port, local_addr=(source, 0)
    )
    return protocol


async def run(spec: dict) -> dict:
    host, port = spec.get("host", "127.0.0.1"), spec["port"]
    keepalive = bool(spec["keepalive"])
    concurrency = int(spec["concurrency"])
    total = int(spec["requests"])
    targets = [
        (source, _request_bytes(path, headers or {}, keepalive=keepalive))
        for source, path, headers in spec["targets"]
    ]
    shares = [targets[k::concurrency] for k in range(concurrency)]
    shares = [share for share in shares if share]
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    connections: dict[str, _Exchange] = {}
    remaining = [total]

    async def one(source: str, data: bytes) -> None:
        start = time.perf_counter()
        try:
            conn = connections.get(source) if keepalive else None
            if conn is None or conn.closed:
                conn = await _connect(host, port, source)
                if keepalive:
                    connections[source] = conn
            status = await conn.request(data)
            if not keepalive:
                conn.transport.close()
        except (OSError, ConnectionError) as error:
            errors[type(error).__name__] += 1
            connections.pop(source, None)
            return
        latencies.append(time.perf_counter() - start)
        statuses[status] += 1

    async def worker(share: list[tuple[str, bytes]]) -> None:
        index = 0
        while remaining[0] > 0:
            remaining[0] -= 1
            source, data = share[index]
            index = (index + 1) % len(share)
            await one(source, data)

    # Warm-up: one request per target (connections opened, every pod seen once), not timed.
    if spec.get("warmup", True):
        for k in range(0, len(targets), 256):
            await asyncio.gather(*(one(s, d) for s, d in targets[k : k + 256]))
    latencies.clear()
    statuses.clear()
    errors.clear()
    # A burst of first requests starts at an agreed moment (the parent adds the pods then).
    if spec.get("start_at"):
        await asyncio.sleep(max(0.0, spec["start_at"] - time.time()))
    # Tell the parent the timed phase starts, so it can measure CPU over exactly this window.
    print("go", flush=True)
    started, cpu_started = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(share) for share in shares))
    seconds = time.perf_counter() - started
    own_cpu = (time.process_time() - cpu_started) / seconds if seconds else 0.0
    print("end", flush=True)
    for conn in connections.values():
        conn.transport.close()
    done = len(latencies)
    return {
        "requests": done,
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "statuses": {str(k): v for k, v in statuses.items()},
        "seconds": seconds,
        "rps": done / seconds if seconds else 0.0,
        "own_cpu": own_cpu,
        **latency_summary(latencies),
    }


def main() -> None:
    spec = json.loads(sys.stdin.read())
    pin(spec.get("cpu"))
    raise_open_files_limit()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    result = runner(run(spec))
    result["loop"] = "uvloop" if runner is not asyncio.run else "asyncio"
    result["pid_cpus"] = sorted(os.sched_getaffinity(0))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
