"""Processes for the benchmarks: each measured component runs in its own process, pinned to one
core, so that what is measured is its own work (and its own memory), and the load generator on
the other core is never competing with it for the same CPU."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The measured process gets one core, the load generator (and this process) the other.
SERVED_CPU = 0
LOAD_CPU = 1


# The cores this machine gives the bench, read once at import: the bench pins itself to
# LOAD_CPU at start (bench/__main__.py), and the cores read after that were that one alone, so
# every process it started ran on the load core and the measured one's core stayed idle.
_CPUS = sorted(os.sched_getaffinity(0))


def cpus() -> list[int]:
    return list(_CPUS)


def cpu(which: int) -> int | None:
    """A core for ``SERVED_CPU``/``LOAD_CPU``; None (no pinning) on a one-core machine."""
    available = cpus()
    if len(available) < 2:
        return None
    return available[which]


def pin(core: int | None) -> None:
    if core is not None:
        os.sched_setaffinity(0, {core})


def raise_open_files_limit() -> None:
    """Bursts open a connection per pod at once: lift the soft limit on open files to the hard
    one (children started afterwards inherit it)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 1 << 20), hard))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    variables = dict(os.environ)
    variables["PYTHONPATH"] = str(REPO) + os.pathsep + variables.get("PYTHONPATH", "")
    variables["PYTHONUNBUFFERED"] = "1"
    variables.update(extra)
    return variables


async def spawn(
    argv: Sequence[str],
    *,
    core: int | None,
    stdin: int | None = asyncio.subprocess.DEVNULL,
    stdout: int | None = asyncio.subprocess.PIPE,
    stderr: int | None = None,
    extra_env: dict[str, str] | None = None,
    cwd: Path = REPO,
) -> asyncio.subprocess.Process:
    """``python <argv>`` from the repository (or ``cwd``, whose packages then come first),
    pinned to ``core``, leading its own group.

    Pinned by ``taskset`` rather than in a ``preexec_fn``: a Python function between fork and
    exec makes the child run gRPC's fork handlers, which abort when this process's gRPC is busy
    (and without one, the child is started with vfork)."""
    prefix = ["taskset", "-c", str(core)] if core is not None and shutil.which("taskset") else []
    return await asyncio.create_subprocess_exec(
        *prefix,
        sys.executable,
        *argv,
        cwd=cwd,
        env=env(**(extra_env or {})),
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
    )


async def stop(process: asyncio.subprocess.Process | None, *, grace: float = 10.0) -> None:
    if process is None or process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


def rss_mb(pid: int) -> tuple[float, float]:
    """(resident, peak resident) memory of ``pid`` in MB, from /proc."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0]) / 1024
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values (0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


# Where the latency distribution is sampled for the report's plots (bench/plots.py).
QUANTILES = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99, 0.995,
             0.999, 1.0)  # fmt: skip


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p99/p99.9/max in milliseconds, and ``quantiles_ms``: [fraction, ms] at
    ``QUANTILES``, the distribution the plots draw."""
    ordered = sorted(seconds)
    return {
        "p50_ms": percentile(ordered, 0.50) * 1000,
        "p99_ms": percentile(ordered, 0.99) * 1000,
        "p999_ms": percentile(ordered, 0.999) * 1000,
        "max_ms": (ordered[-1] * 1000) if ordered else 0.0,
        "quantiles_ms": [[q, percentile(ordered, q) * 1000] for q in QUANTILES] if ordered else [],
    }


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


async def generate(module: str, spec: dict, *, measured_pid: int) -> dict:
    """Run a load generator (``bench.loadgen``, ``bench.grpcload``) in its own process on the
    load core with ``spec`` on stdin; its result, plus the CPU seconds per wall second that
    the process under test (``served_cpu``) and the generator (``generator_cpu``) used over
    exactly the timed phase, which the generator brackets with ``go`` and ``end`` lines."""
    import json
    import time

    spec = {**spec, "cpu": cpu(LOAD_CPU)}
    process = await spawn(["-m", module], core=cpu(LOAD_CPU), stdin=asyncio.subprocess.PIPE)
    process.stdin.write(json.dumps(spec).encode())
    process.stdin.close()
    marks, result = [], None
    while line := await process.stdout.readline():
        if line.strip() in (b"go", b"end"):
            marks.append((time.perf_counter(), cpu_seconds(measured_pid)))
        else:
            result = json.loads(line)
    await process.wait()
    if process.returncode != 0 or len(marks) != 2 or result is None:
        raise RuntimeError(f"{module} failed (exit code {process.returncode})")
    (t0, served0), (t1, served1) = marks
    result["served_cpu"] = (served1 - served0) / (t1 - t0)
    # Measured by the generator itself (process_time over its timed phase): it may have
    # exited by the time its last line is read here.
    result["generator_cpu"] = result.pop("own_cpu")
    return result
