"""Server scale: podiam-server as its own process against the Kubernetes API test server in
another, so the resident memory measured is the server's alone. For each cluster size: the
initial sync (list of namespaces and pods until gRPC is served), resident memory, watch events
processed per second, and unary GetPodCredentials calls/s against a bare grpc.aio servicer with
the same mutual TLS, measured in the same run."""

from __future__ import annotations

import asyncio
import contextlib
import re
import tempfile
import time
from pathlib import Path

import aiohttp

from bench import procs
from bench.report import Section
from certs.authority import generate_bundle, write_bundle
from certs.tls import TlsFiles
from tests.support.moto_sts import FAKE_ACCESS_KEY_ID, FAKE_SECRET_ACCESS_KEY, MotoSts
from tests.support.server import BASE_ARN

ROLES = 50
LOCAL_PODS = 100
_SERVING = re.compile(r"serving gRPC on [^:]+:(\d+)")


class _Kube:
    def __init__(self, pods: int, work: Path) -> None:
        self.pods = pods
        self.kubeconfig = work / f"kubeconfig-{pods}"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> float:
        started = time.perf_counter()
        self.process = await procs.spawn(
            [
                "-m", "bench.kubeproc", "--pods", str(self.pods), "--roles", str(ROLES),
                "--local-pods", str(min(LOCAL_PODS, self.pods)),
                "--kubeconfig", str(self.kubeconfig),
            ],
            core=procs.cpu(procs.LOAD_CPU),
            stdin=asyncio.subprocess.PIPE,
        )  # fmt: skip
        line = await asyncio.wait_for(self.process.stdout.readline(), 300)
        if not line.startswith(b"ready"):
            raise RuntimeError("the Kubernetes API process did not start")
        return time.perf_counter() - started

    async def add(self, count: int) -> None:
        self.process.stdin.write(f"add {count}\n".encode())
        await self.process.stdin.drain()
        line = await asyncio.wait_for(self.process.stdout.readline(), 300)
        if not line.startswith(b"added"):
            raise RuntimeError("the Kubernetes API process did not add pods")

    async def stop(self) -> None:
        await procs.stop(self.process)


class _Server:
    """podiam-server as an operator runs it, its log lines timestamped as they arrive."""

    def __init__(self, kube: _Kube, sts: MotoSts, tls: Path, work: Path) -> None:
        self.kube, self.sts, self.tls, self.work = kube, sts, tls, work
        self.process: asyncio.subprocess.Process | None = None
        self.metrics_port = procs.free_port()
        self.port = 0
        self.marks: dict[str, float] = {}
        self.log: list[str] = []
        self._reader: asyncio.Task | None = None

    async def start(self) -> None:
        files = TlsFiles.server_in(self.tls)
        self.marks["spawn"] = time.perf_counter()
        self.process = await procs.spawn(
            [
                "-m", "server", "--bind", "127.0.0.1:0",
                "--cert", str(files.cert), "--key", str(files.key), "--ca", str(files.ca),
                "--kubeconfig", str(self.kube.kubeconfig),
                "--role-base-arn", BASE_ARN, "--region", "us-east-1",
                "--sts-endpoint", self.sts.endpoint_url,
                "--prometheus-listen-addr", f"127.0.0.1:{self.metrics_port}",
            ],
            core=procs.cpu(procs.SERVED_CPU),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            extra_env={
                "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY_ID,
                "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_ACCESS_KEY,
                "AWS_EC2_METADATA_DISABLED": "true",
            },
        )  # fmt: skip
        self._reader = asyncio.create_task(self._read())
        deadline = time.perf_counter() + 300
        while "serving" not in self.marks:
            if self.process.returncode is not None or time.perf_counter() > deadline:
                raise RuntimeError("podiam-server did not start:\n" + "\n".join(self.log[-20:]))
            await asyncio.sleep(0.01)

    async def _read(self) -> None:
        while line := await self.process.stderr.readline():
            now, text = time.perf_counter(), line.decode(errors="replace").rstrip()
            self.log.append(text)
            if "listing namespaces and pods" in text:
                self.marks["listing"] = now
            elif "synced" in text and "pods" in text:
                self.marks["synced"] = now
            elif match := _SERVING.search(text):
                self.port = int(match.group(1))
                self.marks["serving"] = now

    async def metric(self, session: aiohttp.ClientSession, name: str) -> float:
        async with session.get(f"http://127.0.0.1:{self.metrics_port}/metrics") as response:
            text = await response.text()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

    async def stop(self) -> None:
        await procs.stop(self.process)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


async def _unary(target: str, tls: Path, asks, options, *, pid: int) -> dict:
    spec = {
        "target": target,
        "tls": str(tls),
        "asks": asks,
        "calls": options.unary_calls,
        "concurrency": options.unary_concurrency,
    }
    return await procs.generate("bench.grpcload", spec, measured_pid=pid)


async def _answer_bytes(target: str, tls: Path, ip: str, role: str) -> bytes:
    import grpc

    from certs.tls import channel_credentials
    from protos import kiam_pb2, kiam_pb2_grpc

    credentials = channel_credentials(TlsFiles.agent_in(tls))
    async with grpc.aio.secure_channel(target, credentials) as channel:
        stub = kiam_pb2_grpc.KiamServiceStub(channel)
        answer = await stub.GetPodCredentials(
            kiam_pb2.GetPodCredentialsRequest(ip=ip, role=role), timeout=10
        )
    return answer.SerializeToString()


async def run(section: Section, options) -> None:
    from bench import kubeproc

    work = Path(tempfile.mkdtemp(prefix="podiam-bench-scale-"))
    tls = work / "tls"
    write_bundle(generate_bundle(), tls)
    sts = MotoSts()
    await asyncio.to_thread(sts.start)
    sizes = [0, *options.scale_pods]
    asks = [[kubeproc.pod_ip(k), f"app-{k % ROLES}"] for k in range(LOCAL_PODS)]
    section.notes += [
        "podiam-server runs as its own process (pinned to one core), the Kubernetes API test "
        "server (`tests/support/kubeapi.py`) in another, STS (moto) in the benchmark process.",
        f"pods spread over 100 namespaces and 500 nodes, {ROLES} roles whose pods share a "
        f"session-name annotation ({ROLES} identities, so the prefetch makes {ROLES} AssumeRole "
        "calls whatever the size); the 0-pod row is the process's own footprint.",
        "initial sync: from the server's `listing namespaces and pods` log line to `synced`; "
        "start to serving: from spawning the process to `serving gRPC` (imports, certificate "
        "checks, sync). RSS and peak RSS (VmRSS, VmHWM) from /proc, 1 s after serving.",
        f"watch events/s: {options.watch_events} pods added to the API server at once, until "
        "the server's `podiam_pods_indexed` shows them all (the API server's own encoding of "
        "the events included).",
        f"unary: {options.unary_calls} GetPodCredentials calls, {options.unary_concurrency} "
        "concurrent, over one mutual-TLS channel from a client process on the other core; the "
        "baseline is a bare grpc.aio servicer (`bench/grpcbare.py`) with the same TLS answering "
        "the same bytes. Best of the runs, interleaved.",
    ]
    table = section.table(
        "server by cluster size",
        ["pods", "initial sync s", "start to serving s", "RSS MB", "peak RSS MB",
         "bytes/pod (RSS over 0 pods)", "watch events/s", "unary calls/s", "bare calls/s",
         "ratio", "unary p99 ms", "bare p99 ms", "server CPU"],
    )  # fmt: skip
    rows = []
    bare = None
    try:
        answer_file = work / "answer.bin"
        base_rss = None
        for size in sizes:
            print(f"bench: server scale {size} pods", flush=True, file=__import__("sys").stderr)
            kube = _Kube(size, work)
            await kube.start()
            server = _Server(kube, sts, tls, work)
            try:
                await server.start()
                await asyncio.sleep(1.0)
                rss, peak = procs.rss_mb(server.process.pid)
                base_rss = rss if size == 0 else base_rss
                marks = server.marks
                sync = marks["synced"] - marks["listing"]
                to_serving = marks["serving"] - marks["spawn"]
                row = {"pods": size, "sync_s": sync, "start_s": to_serving, "rss_mb": rss,
                       "peak_rss_mb": peak}  # fmt: skip
                if size == 0:
                    table.add(
                        0, sync, to_serving, rss, peak, "—", "—", "—", "—", "—", "—", "—", "—"
                    )
                    rows.append(row)
                    continue
                per_pod = (rss - base_rss) * 1024 * 1024 / size if base_rss else 0.0
                events = await _watch_rate(kube, server, size, options.watch_events)
                target = f"localhost:{server.port}"
                if bare is None:
                    answer_file.write_bytes(await _answer_bytes(target, tls, *asks[0]))
                    bare, bare_port = await _start_bare(tls, answer_file)
                mine, theirs = [], []
                for _ in range(max(1, options.repeat)):
                    mine.append(await _unary(target, tls, asks, options, pid=server.process.pid))
                    theirs.append(
                        await _unary(f"localhost:{bare_port}", tls, asks, options, pid=bare.pid)
                    )
                unary = max(mine, key=lambda r: r["cps"])
                base = max(theirs, key=lambda r: r["cps"])
                ratio = unary["cps"] / base["cps"] if base["cps"] else 0.0
                row.update(per_pod_bytes=per_pod, watch_events_per_s=events, unary=unary,
                           bare=base, unary_ratio=ratio)  # fmt: skip
                rows.append(row)
                table.add(
                    size, sync, to_serving, rss, peak, per_pod, events, unary["cps"],
                    base["cps"], f"{ratio:.2f}x", unary["p99_ms"], base["p99_ms"],
                    f"{unary['served_cpu']:.2f}",
                )  # fmt: skip
            finally:
                await server.stop()
                await kube.stop()
    finally:
        await procs.stop(bare)
        await asyncio.to_thread(sts.stop)
    section.data["rows"] = rows
    largest = max((r for r in rows if r["pods"]), key=lambda r: r["pods"], default=None)
    at_100k = next((r for r in rows if r["pods"] == 100000), None)
    if at_100k is not None:
        section.check("server RSS at 100k pods", "< 300 MB", f"{at_100k['rss_mb']:.0f} MB",
                      at_100k["rss_mb"] < 300)  # fmt: skip
        section.check("initial sync at 100k pods", "< 15 s", f"{at_100k['sync_s']:.1f} s",
                      at_100k["sync_s"] < 15)  # fmt: skip
    elif largest is not None:
        section.check("server RSS at 100k pods", "< 300 MB",
                      f"not measured (largest: {largest['pods']:,} pods, "
                      f"{largest['rss_mb']:.0f} MB)", None)  # fmt: skip
    measured = [r for r in rows if "unary_ratio" in r]
    if measured:
        worst = min(r["unary_ratio"] for r in measured)
        section.check("unary GetPodCredentials vs bare servicer (worst size)", "≥ 0.70x",
                      f"{worst:.2f}x", worst >= 0.7)  # fmt: skip


async def _start_bare(tls: Path, answer: Path):
    port = procs.free_port()
    process = await procs.spawn(
        ["-m", "bench.grpcbare", "--port", str(port), "--tls", str(tls),
         "--answer-file", str(answer)],
        core=procs.cpu(procs.SERVED_CPU),
    )  # fmt: skip
    line = await asyncio.wait_for(process.stdout.readline(), 30)
    if line.strip() != b"listening":
        raise RuntimeError("the bare gRPC servicer did not start")
    return process, port


async def _watch_rate(kube: _Kube, server: _Server, size: int, count: int) -> float:
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        await kube.add(count)
        while await server.metric(session, "podiam_pods_indexed") < size + count:
            if time.perf_counter() - started > 300:
                raise RuntimeError("the server did not index the added pods")
            await asyncio.sleep(0.02)
        return count / (time.perf_counter() - started)
