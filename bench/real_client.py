"""Real clients: botocore's own credential fetch (IMDSv2 token, role name, credentials — what
every boto3 process does at start and on refresh) from many pods at once, in the network
namespace cluster of the end-to-end tests (``tests/support/e2e.py``): pods are namespaces, the
node's real iptables DNAT rule sends 169.254.169.254:80 to podiam-agent, and podiam-server and
the agent run as processes in their node namespaces. botocore cannot bind a source address, so
on loopback every pod would look the same to the agent; here each pod has its own address.
Needs root, ``ip`` and ``iptables``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import procs
from bench.report import Section

NAMESPACE = "bench"
SESSION_NAME = "iam.amazonaws.com/session-name"

# Runs in each pod: one untimed fetch (the pod's first), then waits at a file barrier so that
# all pods fetch at once, then times `fetches` fetches. One fetcher per process, as an SDK
# keeps one; each fetch asks for a new IMDSv2 token as botocore does.
_POD_SCRIPT = r"""
import json, os, sys, time
from botocore.utils import InstanceMetadataFetcher
barrier, name, fetches = sys.argv[1], sys.argv[2], int(sys.argv[3])
fetcher = InstanceMetadataFetcher(timeout=1, num_attempts=1)
s = time.perf_counter()
first_ok = bool(fetcher.retrieve_iam_role_credentials().get("access_key"))
first = time.perf_counter() - s
open(os.path.join(barrier, "ready-" + name), "w").close()
while not os.path.exists(os.path.join(barrier, "go")):
    time.sleep(0.002)
latencies, failed, start = [], 0, time.time()
for _ in range(fetches):
    s = time.perf_counter()
    ok = bool(fetcher.retrieve_iam_role_credentials().get("access_key"))
    elapsed = time.perf_counter() - s
    if ok:
        latencies.append(elapsed)
    else:
        failed += 1
print(json.dumps({"latencies": latencies, "failed": failed, "start": start, "end": time.time(),
                  "first": first, "first_ok": first_ok}))
"""


def problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces and iptables)"
    missing = [tool for tool in ("ip", "iptables") if shutil.which(tool) is None]
    if missing:
        return f"needs {', '.join(missing)}"
    return None


async def run(section: Section, options) -> None:
    from tests.support.e2e import PodiamCluster

    count, fetches = options.client_pods, options.client_fetches
    barrier = Path(tempfile.mkdtemp(prefix="podiam-bench-barrier-"))
    barrier.chmod(0o777)  # noqa: ASYNC240 - before anything runs
    async with PodiamCluster(workers=1, permitted={NAMESPACE: ".*"}) as podiam:
        pods = [
            podiam.add_pod(0, NAMESPACE, f"client-{k}", "client-role",
                           annotations={SESSION_NAME: "client-app"})
            for k in range(count)
        ]  # fmt: skip
        runs = [
            asyncio.create_task(
                pod.run(sys.executable, "-c", _POD_SCRIPT, str(barrier), pod.name, str(fetches),
                        timeout=300)
            )
            for pod in pods
        ]  # fmt: skip
        deadline = time.monotonic() + 240
        while len(list(barrier.glob("ready-*"))) < count:  # noqa: ASYNC240 - a few files
            if time.monotonic() > deadline or any(task.done() for task in runs):
                break
            await asyncio.sleep(0.05)
        (barrier / "go").touch()
        results = await asyncio.gather(*runs)
    shutil.rmtree(barrier, ignore_errors=True)
    outs = []
    for result in results:
        try:
            outs.append(json.loads(result.stdout.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            outs.append({"latencies": [], "failed": fetches, "start": 0, "end": 0,
                         "first": 0, "first_ok": False, "error": result.stderr[-500:]})  # fmt: skip
    latencies = [s for out in outs for s in out["latencies"]]
    failed = sum(out["failed"] for out in outs)
    started = min(out["start"] for out in outs if out["start"]) if latencies else 0
    ended = max(out["end"] for out in outs) if latencies else 0
    span = ended - started
    rate = len(latencies) / span if span > 0 else 0.0
    summary = procs.latency_summary(latencies)
    first = procs.latency_summary([out["first"] for out in outs if out["first_ok"]])
    section.notes += [
        f"{count} pods (network namespaces) on one node, each a Python process running "
        "botocore's `InstanceMetadataFetcher(timeout=1, num_attempts=1)."
        f"retrieve_iam_role_credentials()` — token PUT, role GET, credentials GET — "
        f"{fetches} times after an untimed first fetch, all pods released together.",
        "podiam-agent (with `--iptables`) and podiam-server run as processes in their node "
        "namespaces, unpinned; the pods' Python processes share the same two cores, so this "
        "is the whole system's rate, clients included.",
    ]
    table = section.table(
        "botocore credential fetches (3 HTTP requests each) through the DNAT rule",
        ["pods", "fetches", "failed", "fetches/s", "p50 ms", "p99 ms", "p99.9 ms", "max ms",
         "first fetch p50 ms", "first fetch max ms"],
    )  # fmt: skip
    table.add(count, len(latencies), failed, rate, summary["p50_ms"], summary["p99_ms"],
              summary["p999_ms"], summary["max_ms"], first["p50_ms"], first["max_ms"])  # fmt: skip
    section.data.update(fetches=len(latencies), failed=failed, rate=rate, latency=summary,
                        first=first)  # fmt: skip
    section.check(
        "botocore fetches from pods all succeed, each within botocore's 1 s",
        "no failures, max < 1000 ms",
        f"{failed} failed, max {summary['max_ms']:.0f} ms",
        failed == 0 and summary["max_ms"] < 1000,
    )
