"""The gRPC load generator: ``python -m bench.grpcload`` reads a JSON spec on stdin —
``{"target", "tls", "asks": [[pod_ip, role], ...], "calls", "concurrency", "cpu"}`` — makes
that many GetPodCredentials calls over one mutual-TLS channel with the agent certificate, as
an agent does, and prints one JSON result line (with ``go``/``end`` lines around the timed
phase, so the caller can measure CPU over exactly that window)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path

import grpc

from bench.procs import latency_summary, pin
from certs.tls import TlsFiles, channel_credentials
from protos import kiam_pb2, kiam_pb2_grpc


async def run(spec: dict) -> dict:
    credentials = channel_credentials(TlsFiles.agent_in(Path(spec["tls"])))
    async with grpc.aio.secure_channel(spec["target"], credentials) as channel:
        stub = kiam_pb2_grpc.KiamServiceStub(channel)
        requests = [
            kiam_pb2.GetPodCredentialsRequest(ip=ip, role=role) for ip, role in spec["asks"]
        ]
        latencies: list[float] = []
        codes: Counter[str] = Counter()
        remaining = [int(spec["calls"])]

        async def worker(offset: int) -> None:
            index = offset
            while remaining[0] > 0:
                remaining[0] -= 1
                request = requests[index % len(requests)]
                index += 1
                started = time.perf_counter()
                try:
                    await stub.GetPodCredentials(request, timeout=10)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    codes[error.code().name] += 1
                    continue
                latencies.append(time.perf_counter() - started)

        # Warm-up: connect, and one call per pod, untimed.
        for request in requests:
            await stub.GetPodCredentials(request, timeout=10)
        print("go", flush=True)
        started, cpu_started = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(k) for k in range(int(spec["concurrency"]))))
        seconds = time.perf_counter() - started
        own_cpu = (time.process_time() - cpu_started) / seconds if seconds else 0.0
        print("end", flush=True)
    return {
        "calls": len(latencies),
        "codes": dict(codes),
        "seconds": seconds,
        "cps": len(latencies) / seconds if seconds else 0.0,
        "own_cpu": own_cpu,
        **latency_summary(latencies),
    }


def main() -> None:
    spec = json.loads(sys.stdin.read())
    pin(spec.get("cpu"))
    print(json.dumps(asyncio.run(run(spec))), flush=True)


if __name__ == "__main__":
    main()
