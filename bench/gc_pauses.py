"""Garbage-collector pauses in a server whose index churns.

server/heap.py freezes the index after the initial sync, but every pod made afterwards is a new
object the collector tracks: once a rollout has replaced the index, full collections walk all
of it again, each a stall of every watch, node stream and request. This measures it: the
server (bench/gc_probe.py: gc.callbacks and a loop-lag probe inside its process) synced with
``--pods`` pods from the Kubernetes API test server, then the whole index replaced
``--replacements`` times through the watch, with the rollout of bench/server_scale.py (each pod
created, bound, started; the old one marked deleted, then deleted); then ``--bursts`` bursts of
``--burst`` new pods each (the index growing, as the server scale bench's watch burst).

    python -m bench.gc_pauses [--pods 100000] [--replacements 3] [--bursts 5 --burst 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench import procs
from bench.server_scale import _Kube, _Server, _timed_rollout, _until_indexed
from certs.authority import generate_bundle, write_bundle
from tests.support.moto_sts import MotoSts


class _Probed(_Server):
    def __init__(self, kube: _Kube, sts: MotoSts, tls: Path, probe: Path):
        super().__init__(kube, sts, tls)
        self.module = "bench.gc_probe"
        self.env["PODIAM_GC_PROBE"] = str(probe)
        self.probe = probe


def _lines(probe: Path) -> list[dict]:
    return [json.loads(line) for line in probe.read_text().splitlines() if line.strip()]


def _summary(lines: list[dict], since: float, until: float) -> dict:
    window = [line for line in lines if "lag_max" in line and since <= line["t"] <= until + 1]
    by_gen: dict[int, list[float]] = {0: [], 1: [], 2: []}
    for line in window:
        for generation, at, seconds in line["gc"]:
            if since <= at <= until:
                by_gen[generation].append(seconds)
    result = {"lag_max_ms": 1000 * max((line["lag_max"] for line in window), default=0.0)}
    for generation, seconds in by_gen.items():
        seconds.sort()
        result[f"gen{generation}"] = {
            "count": len(seconds),
            "p50_ms": 1000 * procs.percentile(seconds, 0.5) if seconds else 0.0,
            "max_ms": 1000 * seconds[-1] if seconds else 0.0,
            "total_s": sum(seconds),
        }
    result["frozen"] = window[-1]["frozen"] if window else 0
    return result


async def _measure(args, work: Path, sts: MotoSts, tls: Path) -> dict:
    kube = _Kube(0, args.nodes, work)
    await kube.start()
    await kube.add(args.pods)
    server = _Probed(kube, sts, tls, work / "probe.jsonl")
    rounds = []
    try:
        await server.start()
        await _until_indexed(server, args.pods)
        await asyncio.sleep(2.0)
        rss_synced, _ = procs.rss_mb(server.process.pid)

        async def replace() -> float:
            rate, _, _ = await _timed_rollout(server, args.pods)
            return rate["seconds"]

        for replacement in range(1, args.replacements + 1):
            rounds.append(await _round(server, str(replacement), replace))
        for burst in range(1, args.bursts + 1):
            indexed = args.pods + burst * args.burst
            rounds.append(
                await _round(server, f"b{burst}", lambda n=indexed: _burst(server, args.burst, n))
            )
    finally:
        await server.stop()
        await kube.stop()
    final = [line for line in _lines(server.probe) if "final_collect" in line]
    return {"rss_synced_mb": rss_synced, "rounds": rounds,
            "final_collect": final[-1]["final_collect"] if final else None}  # fmt: skip


async def _round(server: _Probed, name: str, churn: Callable[[], Awaitable[float]]) -> dict:
    """One round of churn, with the collections and the loop lag the probe saw during it."""
    since = time.time()
    seconds = await churn()
    until = time.time()
    await asyncio.sleep(1.5)  # the probe's last line for the window
    row = _summary(_lines(server.probe), since, until)
    row.update(replacement=name, seconds=seconds, rss_mb=procs.rss_mb(server.process.pid)[0])
    print(f"gc_pauses: {json.dumps(row)}", flush=True)
    return row


async def _burst(server: _Probed, count: int, indexed: int) -> float:
    """``count`` pods added at once (Running, with IPs), until the server has them all."""
    started = time.perf_counter()
    await server.kube.add(count)
    await _until_indexed(server, indexed)
    return time.perf_counter() - started


def _print(result: dict, pods: int) -> None:
    print(f"\n{pods:,} pods, RSS after sync and settle "
          f"{result['rss_synced_mb']:.0f} MB; objects gc.collect() found after the server "
          f"stopped and unfroze: {result['final_collect']}")  # fmt: skip
    print("  repl  secs   gen0 n/p50/max ms     gen1 n/p50/max ms     gen2 n/p50/max ms"
          "       loop lag max ms  frozen      RSS MB")  # fmt: skip
    for row in result["rounds"]:
        cells = "  ".join(
            f"{row[g]['count']:5d} {row[g]['p50_ms']:6.1f} {row[g]['max_ms']:6.1f}"
            for g in ("gen0", "gen1", "gen2")
        )
        print(f"  {row['replacement']!s:>4} {row['seconds']:5.0f}  {cells}  "
              f"{row['lag_max_ms']:9.0f}  {row['frozen']:10,d}  {row['rss_mb']:8.0f}")  # fmt: skip


async def run(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="podiam-bench-gc-"))
    tls = work / "tls"
    write_bundle(generate_bundle(), tls)
    sts = MotoSts()
    await asyncio.to_thread(sts.start)
    try:
        result = await _measure(args, work, sts, tls)
    finally:
        await asyncio.to_thread(sts.stop)
    print(f"\nload average at the end: {os.getloadavg()}")
    _print(result, args.pods)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=100_000)
    parser.add_argument("--nodes", type=int, default=500)
    parser.add_argument("--replacements", type=int, default=3)
    parser.add_argument("--bursts", type=int, default=5)
    parser.add_argument("--burst", type=int, default=10_000)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
