"""Server scale: podiam-server as its own process against the Kubernetes API test server in
another, so the resident memory measured is the server's alone. For each cluster size: the
initial sync (list of namespaces and pods until gRPC is served), resident memory, watch events
processed per second, and unary GetPodCredentials calls/s against a bare grpc.aio servicer with
the same mutual TLS, measured in the same run.

Watch events come in two mixes. The burst adds pods already Running with an IP, so every event
changes a node's state and costs a node-stream message: the worst case. The rollout is what a
cluster's churn sends. Captured from the real control plane (tests/support/controlplane.py:
kube-apiserver, the scheduler, the controller manager's Deployment and ReplicaSet controllers,
kwok with tests/controlplane/kwok-stages.yaml), a Deployment of 3 pods rolled out (maxSurge 1)
then deleted, watched with podiam's field selector (``status.phase!=Failed,...!=Succeeded``):
every pod, old or new, went through the same six events —

    ADDED     Pending, no node, no IPs                 (ReplicaSet controller)  record: new
    MODIFIED  spec.nodeName, PodScheduled condition    (scheduler's binding)    record: same
    MODIFIED  Running, hostIP, podIP, conditions, containerStatuses, startTime
                                                       (kwok as the kubelet)   record: changed
    MODIFIED  deletionTimestamp, deletionGracePeriodSeconds 30, generation 2
                                                       (graceful delete)        record: same
    MODIFIED  deletionGracePeriodSeconds 0, deletionTimestamp now
                                                       (kwok: containers gone)  record: same
    DELETED                                            (kwok)                   record: gone

— so podiam's record (server/pods.py ``pod_from_object``) changes on 3 of 6, and a node's state
(what its stream carries: the pod's IP and grant) on 2 of 6: the start and the deletion. The
ADDED of a pod with no IP is kept but concerns no node. (Not captured here: a real kubelet
writes more statuses than kwok's one-step stage — hostIP and ContainerCreating before the IP,
Ready after a probe, containers terminated, perhaps a finished phase that the field selector
turns into the DELETED; still only the IP's arrival and the pod's end change what a node's
stream carries, so a real node sends more events per pod, not more state changes.)
bench/kubeproc.py ``rollout`` replays exactly the captured writes on the test double."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from bench import procs
from bench.report import Section
from bench.serverproc import ServerProcess
from certs.authority import generate_bundle, write_bundle
from certs.tls import TlsFiles
from server.reflector import DEFAULT_PAGE_SIZE
from tests.support.moto_sts import MotoSts

ROLES = 50
LOCAL_PODS = 100
PAGE_SIZE = DEFAULT_PAGE_SIZE  # podiam-server's list page size
# 31-minute sessions refreshed with 30 minutes left: the cache renews each identity once a minute
# (server/credentials.py MIN_REFRESH_INTERVAL).
REFRESH_SESSION, REFRESH_BEFORE = "31m", "30m"
REFRESH_WAIT = 150.0  # seconds: over two refresh rounds
REFRESH_QUIET = 20.0  # seconds without a new credential set (and its deliveries): between rounds
# The simulated agents' processes (all on the load core): a few, so that no one process holds
# thousands of connections (--scale-agent-processes).
AGENT_PROCESSES = 4
# The rollout's surge: new pods started (and old ones deleted) together, per wave.
ROLLOUT_WAVE = 500
# Events of one pod replaced in a rollout, through podiam's field selector, as the real control
# plane writes them (see the notes): 3 for the new pod, 3 for the old one.
EVENTS_PER_REPLACEMENT = 6
_POD_EVENTS = re.compile(
    r'^podiam_kube_watch_events_total\{(?=[^}]*resource="pods")(?=[^}]*type="(?:ADDED|MODIFIED|'
    r'DELETED)")[^}]*\} (\S+)$', re.MULTILINE,
)  # fmt: skip
_OBTAINED = re.compile(r"^(\S+ \S+) .*audit: credentials obtained: .*access_key_id=(\S+)")


class _Kube:
    def __init__(self, pods: int, nodes: int, work: Path) -> None:
        self.pods = pods
        self.nodes = nodes
        self.kubeconfig = work / f"kubeconfig-{pods}"
        self.process: asyncio.subprocess.Process | None = None
        self.url = ""

    async def start(self) -> float:
        started = time.perf_counter()
        self.process = await procs.spawn(
            [
                "-m", "bench.kubeproc", "--pods", str(self.pods), "--roles", str(ROLES),
                "--local-pods", str(min(LOCAL_PODS, self.pods)), "--nodes", str(self.nodes),
                "--kubeconfig", str(self.kubeconfig),
            ],
            core=procs.cpu(procs.LOAD_CPU),
            stdin=asyncio.subprocess.PIPE,
        )  # fmt: skip
        line = await asyncio.wait_for(self.process.stdout.readline(), 300)
        if not line.startswith(b"ready"):
            raise RuntimeError("the Kubernetes API process did not start")
        self.url = line.split()[1].decode()
        return time.perf_counter() - started

    async def add(self, count: int) -> None:
        await self._command(f"add {count}", b"added")

    async def remove(self, count: int) -> None:
        await self._command(f"remove {count}", b"removed")

    async def rollout(self, count: int) -> dict:
        """The ``count`` pods added first replaced by as many new ones (bench/kubeproc.py)."""
        self.process.stdin.write(f"rollout {count} {ROLLOUT_WAVE}\n".encode())
        await self.process.stdin.drain()
        line = await asyncio.wait_for(self.process.stdout.readline(), 600)
        if not line.startswith(b"rolled"):
            raise RuntimeError("the Kubernetes API process did not roll out")
        return json.loads(line[len(b"rolled") :])

    async def _command(self, command: str, answer: bytes) -> None:
        self.process.stdin.write(f"{command}\n".encode())
        await self.process.stdin.drain()
        line = await asyncio.wait_for(self.process.stdout.readline(), 300)
        if not line.startswith(answer):
            raise RuntimeError(f"the Kubernetes API process did not {command}")

    async def list_alone(self) -> dict:
        """The API server's own share of a sync (bench/kubelist.py), from the server's core."""
        process = await procs.spawn(
            ["-m", "bench.kubelist", "--url", self.url, "--page-size", str(PAGE_SIZE)],
            core=procs.cpu(procs.SERVED_CPU),
        )
        line = await asyncio.wait_for(process.stdout.readline(), 600)
        await process.wait()
        return json.loads(line)

    async def watch_alone(self, count: int) -> dict:
        """The API server's own share of the watch-event rate (bench/kubewatch.py), from the
        server's core: ``count`` pods added while a bare client watches, then removed."""
        result = await self._bare_watch(count, lambda: self.add(count))
        await self.remove(count)
        return result

    async def lifecycle_alone(self, count: int) -> dict:
        """``watch_alone`` for a rollout of ``count`` pods (added first, unwatched)."""
        await self.add(count)
        result = await self._bare_watch(count * EVENTS_PER_REPLACEMENT, lambda: self.rollout(count))
        await self.remove(count)
        return result

    async def _bare_watch(self, events: int, write: Callable[[], Awaitable]) -> dict:
        """What a bare client on the server's core counts while ``write`` makes ``events``."""
        process = await procs.spawn(
            ["-m", "bench.kubewatch", "--url", self.url, "--count", str(events)],
            core=procs.cpu(procs.SERVED_CPU),
        )
        try:
            line = await asyncio.wait_for(process.stdout.readline(), 60)
            if line.strip() != b"watching":
                raise RuntimeError("the bare watch did not start")
            await write()
            line = await asyncio.wait_for(process.stdout.readline(), 600)
            await process.wait()
        finally:
            await procs.stop(process)
        return json.loads(line)

    async def stop(self) -> None:
        await procs.stop(self.process)


class _Server(ServerProcess):
    """podiam-server against ``kube``, from ``tree`` (a checkout of another revision) when
    given, else from this one; with ``profile``, py-spy samples it and the API server over the
    initial sync."""

    def __init__(
        self, kube: _Kube, sts: MotoSts, tls: Path, *, tree: Path | None = None,
        profile: Path | None = None,
    ) -> None:  # fmt: skip
        # One process stands in for every node's agent (bench/nodestreams.py).
        super().__init__(
            kube.kubeconfig, sts, tls, cwd=tree,
            args=[
                "--no-node-binding",
                # Sessions that the cache renews a minute after fetching them, so that the
                # node streams see a refresh of every identity within the run.
                "--session-duration", REFRESH_SESSION, "--session-refresh", REFRESH_BEFORE,
            ],
        )  # fmt: skip
        self.kube = kube
        self.profile = profile
        self._profilers: list[asyncio.subprocess.Process] = []
        # AccessKeyId → when the server obtained it (time.time()), from its audit log lines.
        self.obtained: dict[str, float] = {}

    async def start(self) -> None:
        await self.spawn()
        if self.profile is not None:
            await asyncio.sleep(0.2)  # until taskset has become python
            for pid, name in ((self.process.pid, "server"), (self.kube.process.pid, "kubeapi")):
                self._profilers.append(await _profiler(pid, self.profile.with_name(
                    f"{self.profile.name}-{name}.txt")))  # fmt: skip
        await self.serving()

    def logged(self, text: str) -> None:
        if match := _OBTAINED.match(text):
            self.obtained[match.group(2)] = _log_time(match.group(1))

    def synced(self) -> None:
        for profiler in self._profilers:  # the sync only
            with contextlib.suppress(ProcessLookupError):
                profiler.send_signal(signal.SIGINT)

    async def stop(self) -> None:
        for profiler in self._profilers:
            await profiler.wait()
        await super().stop()


async def _profiler(pid: int, out: Path) -> asyncio.subprocess.Process:
    """py-spy sampling ``pid`` (collapsed stacks to ``out``) until sent SIGINT."""
    return await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid),
        "--format", "raw", "--rate", "100", "--nonblocking", "--output", str(out),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


async def _checkout(revision: str, work: Path) -> Path:
    """The packages podiam-server runs from, as of ``revision``, in a directory of their own."""
    tree = work / f"rev-{revision}"
    tree.mkdir()
    archive = await asyncio.create_subprocess_shell(
        f"git -C {procs.REPO} archive {revision} server runtime certs protos | tar -x -C {tree}"
    )
    if await archive.wait() != 0:
        raise RuntimeError(f"cannot check out {revision}")
    return tree


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
    # (label, tree): the revision given with --scale-baseline first, then this tree.
    variants: list[tuple[str, Path | None]] = [("this tree", None)]
    if options.scale_baseline:
        tree = await _checkout(options.scale_baseline, work)
        variants.insert(0, (options.scale_baseline, tree))
    profiles = Path(options.scale_profile) if options.scale_profile else None
    if profiles is not None:
        profiles.mkdir(parents=True, exist_ok=True)
    section.notes += [
        "podiam-server runs as its own process (pinned to one core), the Kubernetes API test "
        "server (`tests/support/kubeapi.py`) in another (on the other core), STS (moto) in the "
        "benchmark process.",
        f"pods spread over 100 namespaces and {options.scale_nodes:,} nodes, {ROLES} roles whose "
        f"pods share a session-name annotation ({ROLES} identities, so the prefetch makes "
        f"{ROLES} AssumeRole calls whatever the size); the 0-pod row is the process's own "
        "footprint.",
        "API list alone: a bare aiohttp client on the server's core listing every page as the "
        f"server does (limit={PAGE_SIZE}, same field selector) and discarding the bodies — the "
        "API server's own share of the sync, the floor for any client of it. API watch alone: "
        "the same for the watch-event burst below (`bench/kubewatch.py`: a bare watch from the "
        "server's core counting the events, decoding none).",
        "initial sync: from the server's `listing namespaces and pods` log line to `synced`; "
        "start to serving: from spawning the process to `serving gRPC` (imports, certificate "
        "checks, sync); sync CPU: the CPU seconds the server process used between those two "
        "lines (what the sync costs, whatever else the shared machine was running). RSS and "
        "peak RSS (VmRSS, VmHWM) from /proc, 1 s after serving.",
        f"node streams: {options.scale_streams:,} simulated agents (`bench/nodestreams.py`, "
        f"{_agent_processes(options)} processes on the other core, one WatchNode stream per node, "
        "each over "
        "a TCP connection of its own as real agents hold them, with the real agent's channel "
        "options — keepalive pings every 5 s, which the server's keepalive enforcement "
        "accepts 4 s apart and more; the server runs with "
        "`--no-node-binding` so that one process may stand in for many nodes); connected: "
        "until every stream has its snapshot, all opened at once (a connect storm), a try that "
        "fails before its snapshot retried with the agent's backoff (connect retries); failed: "
        "streams that never had one; dropped: streams lost after their snapshot over the whole "
        "run, each reconnected with the agent's backoff, and the phase each was lost in (a "
        "`too_many_pings` among them would be the server refusing the agents' keepalive); a "
        "stream whose connection the server recycles (GOAWAY) moves to a new one as the "
        "agent's does, which is no loss; KB/stream: the server's RSS growth over them "
        "(connection included).",
        f"refresh delivery: the server runs with `--session-duration {REFRESH_SESSION} "
        f"--session-refresh {REFRESH_BEFORE}`, so the cache renews every identity a minute after "
        "fetching it; once every stream is connected, from the server's log line for each new "
        "credential set (`audit: credentials obtained`, millisecond timestamps) to the moment "
        "the simulated agent received it on each stream that holds a pod of that identity; per "
        "node the last of its identities, p50/p99/max over nodes, and all nodes: from the "
        "round's first new set to the last node having all of its own.",
        f"watch events/s: {options.watch_events} pods added to the API server at once (spread "
        "over the nodes), until each has reached its own node's stream (with streams) or the "
        "server's `podiam_pods_indexed` shows them all (without); the API server's own "
        "creating and encoding of the events included. Misrouted: pod states that reached "
        "another node's stream (must be 0). Stream messages: the node-stream messages that "
        "carried them (fewer than the events when changes coalesce); delivery p50/p99: from the "
        "moment the pods are asked for to each one's arrival at its node's stream (the API "
        "server's creating of the burst included). Then deleted again, so every server measured "
        "lists "
        "the same cluster. Events per server CPU s: the same events over the CPU seconds the "
        "server used meanwhile — what one core of the server sustains, whatever the machine's "
        "other load.",
        f"watch events by mix: the burst above, and a rollout of {options.lifecycle_pods:,} "
        "pods: as many pods added first (not measured), then replaced by new ones in waves of "
        f"{ROLLOUT_WAVE} (`bench/kubeproc.py rollout`), each pod through the six watch events "
        "the real control plane writes (the module's docstring: created Pending, bound, "
        "started; the old ones marked for deletion, marked with no grace period, deleted), "
        f"{EVENTS_PER_REPLACEMENT} events per pod replaced, of which 2 change a node's state. "
        "Events: those the server took (its `podiam_kube_watch_events_total` for pods, which "
        "must equal what the API server wrote); timed from the rollout's start until the "
        "server has taken every event and, with streams, every new pod's state and every old "
        "pod's removal has reached its own node's stream (state-changing events: those "
        "arrivals; misrouted: one of them on another node's stream; missing: never arrived on a "
        "live stream, and those of streams that ended meanwhile, no longer awaited, beside it); "
        "delivery p50/p99 from the moment the API server had written a wave's change to its "
        "arrival (when the API server writes faster than the server takes the events, this is "
        "mostly the backlog's wait); API wrote s: how long the API server took to write them "
        "all. API watch alone: the same rollout to the bare watch.",
        f"unary: {options.unary_calls} GetPodCredentials calls, {options.unary_concurrency} "
        "concurrent, over one mutual-TLS channel from a client process on the other core; the "
        "baseline is a bare grpc.aio servicer (`bench/grpcbare.py`) with the same TLS answering "
        "the same bytes. Best of the runs, interleaved.",
    ]
    if options.scale_baseline:
        section.notes.append(
            f"server `{options.scale_baseline}`: podiam-server's packages as of that revision "
            "(git archive), measured in the same run against the same API server process."
        )
    table = section.table(
        "server by cluster size",
        ["pods", "server", "API list alone s", "API watch alone events/s", "initial sync s",
         "sync CPU s",
         "start to serving s",
         "RSS MB", "peak RSS MB", "bytes/pod (RSS over 0 pods)", "node streams",
         "streams failed", "streams dropped", "connect retries", "streams connected s",
         "KB/stream", "refresh p50 ms",
         "refresh p99 ms", "refresh max ms", "refresh all nodes s", "misrouted",
         "stream messages", "delivery p50 ms", "delivery p99 ms",
         "watch events/s (each event changes a node)",
         "events per server CPU s",
         "unary calls/s", "bare calls/s", "ratio", "ratio per round", "unary p99 ms",
         "bare p99 ms", "server CPU", "CPU µs/call", "bare CPU µs/call"],
    )  # fmt: skip
    mixes = section.table(
        "watch events by mix",
        ["pods", "server", "mix", "events", "state-changing events", "API watch alone events/s",
         "API wrote s", "seconds", "watch events/s", "events per server CPU s",
         "stream messages",
         "delivery p50 ms", "delivery p99 ms", "misrouted", "missing"],
    )  # fmt: skip
    rows = []
    bare: dict = {"answer": work / "answer.bin"}  # the bare servicer, started once
    try:
        base_rss: dict[str, float] = {}
        for size in sizes:
            print(f"bench: server scale {size} pods", flush=True, file=sys.stderr)
            kube = _Kube(size, options.scale_nodes, work)
            await kube.start()
            try:
                alone = await kube.list_alone() if size else None
                if alone is not None:
                    watched = await kube.watch_alone(options.watch_events)
                    alone["watch_events_per_s"] = watched["events"] / watched["seconds"]
                    if options.lifecycle_pods:
                        watched = await kube.lifecycle_alone(options.lifecycle_pods)
                        alone["lifecycle_events_per_s"] = watched["events"] / watched["seconds"]
                for label, tree in variants:
                    profile = profiles / f"{size}-{label.replace(' ', '-')}" if profiles else None
                    server = _Server(kube, sts, tls, tree=tree, profile=profile)
                    try:
                        row = await _measure(
                            server, size, label, alone, base_rss, options, tls, asks, bare,
                        )  # fmt: skip
                    finally:
                        await server.stop()
                    rows.append(row)
                    _add_row(table, row)
                    _add_mix_rows(mixes, row, options)
            finally:
                await kube.stop()
    finally:
        await procs.stop(bare.get("process"))
        await asyncio.to_thread(sts.stop)
    section.data["rows"] = rows
    mine = [r for r in rows if r["server"] == "this tree" and r["pods"]]
    largest = max(mine, key=lambda r: r["pods"], default=None)
    if largest is not None:
        n = largest["pods"]
        section.check(f"initial sync at {n:,} pods", "< 30 s", f"{largest['sync_s']:.1f} s",
                      largest["sync_s"] < 30 if n >= 550000 else None)  # fmt: skip
        section.check(f"server RSS at {n:,} pods", "< 500 MB", f"{largest['rss_mb']:.0f} MB",
                      largest["rss_mb"] < 500 if n >= 550000 else None)  # fmt: skip
        section.check("watch events/s, every event changes a node's state (largest size)",
                      "measured", f"{largest['watch_events_per_s']:,.0f}",
                      largest["watch_events_per_s"] > 0)  # fmt: skip
        lifecycle = largest.get("lifecycle")
        if lifecycle:
            streams = " with the node-stream fan-out" if "streams" in largest else ""
            section.check(f"watch events/s, pod lifecycle (rollout){streams} (largest size)",
                          "≥ 20,000", f"{lifecycle['events_per_s']:,.0f}",
                          lifecycle["events_per_s"] >= 20000 and not lifecycle.get("misrouted")
                          and not lifecycle.get("missing"))  # fmt: skip
    if largest is not None and "streams" in largest:
        failed, refresh = largest["streams_failed"], largest["refresh"]
        section.check(f"node streams connected at once ({largest['streams']:,})", "0 failed",
                      f"{failed:,} failed", failed == 0)  # fmt: skip
        _check_losses(section, largest)
        section.check("credentials refresh reaching every node that needs it", "measured",
                      f"{refresh['nodes']:,} nodes, {refresh['waiting']:,} still waiting",
                      refresh["waiting"] == 0 and refresh["nodes"] > 0)  # fmt: skip
    measured = [r for r in mine if "unary_ratio" in r]
    if measured:
        worst = min(r["unary_ratio"] for r in measured)
        section.check("unary GetPodCredentials vs bare servicer (worst size)", "≥ 0.90x",
                      f"{worst:.2f}x", worst >= 0.9)  # fmt: skip


async def _measure(
    server: _Server, size: int, label: str, alone: dict | None, base_rss: dict[str, float],
    options, tls: Path, asks, bare: dict,
) -> dict:  # fmt: skip
    await server.start()
    await asyncio.sleep(1.0)
    rss, peak = procs.rss_mb(server.process.pid)
    if size == 0:
        base_rss[label] = rss
    marks = server.marks
    row = {"pods": size, "server": label, "sync_s": marks["synced"] - marks["listing"],
           "sync_cpu_s": marks["synced_cpu"] - marks["listing_cpu"],
           "start_s": marks["serving"] - marks["spawn"], "rss_mb": rss,
           "peak_rss_mb": peak, "api_alone_s": alone["seconds"] if alone else None,
           "api_watch_alone_per_s": alone.get("watch_events_per_s") if alone else None,
           "api_lifecycle_alone_per_s": alone.get("lifecycle_events_per_s") if alone else None,
           }  # fmt: skip
    if size == 0:
        return row
    base = base_rss.get(label)
    row["per_pod_bytes"] = (rss - base) * 1024 * 1024 / size if base else 0.0
    target = f"localhost:{server.port}"
    if "process" not in bare:
        answer = await _answer_bytes(target, tls, *asks[0])
        await asyncio.to_thread(bare["answer"].write_bytes, answer)
        bare["process"], bare["port"] = await _start_bare(tls, bare["answer"])
    bare_process, bare_port = bare["process"], bare["port"]
    mine, theirs = [], []
    for round_ in range(max(1, options.repeat)):
        profiler = None
        if server.profile is not None and round_ == 0:  # the first round of unary calls
            out = server.profile.with_name(f"{server.profile.name}-unary-server.txt")
            profiler = await _profiler(server.process.pid, out)
            await asyncio.sleep(0.5)
        mine.append(await _unary(target, tls, asks, options, pid=server.process.pid))
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            await profiler.wait()
        theirs.append(
            await _unary(f"localhost:{bare_port}", tls, asks, options, pid=bare_process.pid)
        )
    unary = max(mine, key=lambda r: r["cps"])
    bare_best = max(theirs, key=lambda r: r["cps"])
    ratio = unary["cps"] / bare_best["cps"] if bare_best["cps"] else 0.0
    # Each round's ratio too (its podiam run over the bare run that followed it), and the
    # server CPU per call: a loaded machine moves the best-of ratio, the CPU per call less.
    rounds = [
        {"ratio": m["cps"] / t["cps"] if t["cps"] else 0.0,
         "cpu_us": _cpu_per_call_us(m), "bare_cpu_us": _cpu_per_call_us(t)}
        for m, t in zip(mine, theirs, strict=True)
    ]  # fmt: skip
    row.update(unary=unary, bare=bare_best, unary_ratio=ratio, unary_rounds=rounds)
    if options.scale_streams:
        try:
            row.update(await _node_streams(server, size, tls, options))
        except (RuntimeError, TimeoutError) as error:
            print(f"bench: node streams failed: {error!r}", file=sys.stderr, flush=True)
            row["streams_error"] = repr(error)
            row["watch_events_per_s"] = 0.0
    else:
        # Last, since it changes the cluster (and puts it back).
        row["watch_events_per_s"] = await _watch_rate(
            server.kube, server, size, options.watch_events
        )
        if options.lifecycle_pods:
            row["lifecycle"] = await _lifecycle_rate(server, size, options.lifecycle_pods)
    return row


async def _node_streams(server: _Server, size: int, tls: Path, options) -> dict:
    """One WatchNode stream per node, each over its own connection, from a few simulated-agents
    processes (bench/nodestreams.py): what the streams cost the server in memory, how long
    until every one has its snapshot, how long a credentials refresh takes to reach every node
    that needs it, and the watch-event rate with every event fanned out to its node's stream."""
    from bench import kubeproc

    nodes = options.scale_nodes
    streams = min(options.scale_streams, nodes)
    hosts = [kubeproc.node_ip(n) for n in range(streams)]
    share = -(-streams // _agent_processes(options))
    slices = [hosts[k : k + share] for k in range(0, streams, share)]
    before, _ = procs.rss_mb(server.process.pid)
    clients = []
    phases: list[tuple[str, float]] = []  # (phase, time.time() it began), for the stream losses
    try:
        started = time.perf_counter()
        phases.append(("connect storm", time.time()))
        for part in slices:
            spec = {"target": f"localhost:{server.port}", "tls": str(tls), "hosts": part,
                    "cpu": procs.cpu(procs.LOAD_CPU)}  # fmt: skip
            client = await procs.spawn(
                ["-m", "bench.nodestreams"], core=procs.cpu(procs.LOAD_CPU),
                stdin=asyncio.subprocess.PIPE,
            )  # fmt: skip
            clients.append(client)
            client.stdin.write(json.dumps(spec).encode() + b"\n")
            await client.stdin.drain()
        readies = await asyncio.gather(*(_line(c, b"ready", 900) for c in clients))
        connected = time.perf_counter() - started
        failed = sum(r["failed"] for r in readies)
        if failed:
            print(f"bench: node streams failed: {readies}", file=sys.stderr, flush=True)
        phases.append(("connected", time.time()))
        await asyncio.sleep(1.0)
        after, _ = procs.rss_mb(server.process.pid)
        refresh = await _refresh_delivery(server, clients, phases)
        # Pods added on nodes that have streams only: node k % nodes for k from size on.
        count = options.watch_events
        await _tell(clients, f"watch {size} {count} {nodes}")
        await asyncio.gather(*(_line(c, b"watching", 60) for c in clients))
        profilers = []
        if server.profile is not None:  # the watch phase, on all sides
            sides = [(server.process.pid, "server"), (server.kube.process.pid, "kubeapi"),
                     *((c.pid, f"agents{k}") for k, c in enumerate(clients))]  # fmt: skip
            for pid, name in sides:
                out = server.profile.with_name(f"{server.profile.name}-watch-{name}.txt")
                profilers.append(await _profiler(pid, out))
            await asyncio.sleep(0.5)
        started = time.perf_counter()
        cpu_started = procs.cpu_seconds(server.process.pid)
        phases.append(("watch burst", time.time()))
        await server.kube.add(count)
        results = await asyncio.gather(*(_line(c, b"watched", 600) for c in clients))
        seconds = time.perf_counter() - started
        cpu = procs.cpu_seconds(server.process.pid) - cpu_started
        watched = {key: sum(r[key] for r in results) for key in ("delivered", "misrouted",
                                                                  "updates")}  # fmt: skip
        watched["seconds"] = max(r["seconds"] for r in results)
        latencies = sorted(t for r in results for t in r["latencies"])
        watched["delivery_p50_ms"] = procs.percentile(latencies, 0.5) * 1000
        watched["delivery_p99_ms"] = procs.percentile(latencies, 0.99) * 1000
        await _stop_profilers(profilers)
        phases.append(("removal", time.time()))
        await server.kube.remove(count)
        await _until_indexed(server, size)
        lifecycle = None
        if options.lifecycle_pods:
            phases.append(("rollout", time.time()))
            lifecycle = await _stream_lifecycle(server, clients, size, options)
        # The losses and moves over the whole run, each placed in the phase it happened in.
        await _tell(clients, "status")
        statuses = await asyncio.gather(*(_line(c, b"status", 60) for c in clients))
        losses = by_phase(phases, (at for s in statuses for at, _ in s["dropped_at"]))
        await _tell(clients, "quit")
    finally:
        for client in clients:
            await procs.stop(client)
    return {
        "streams": streams,
        "streams_connect_s": connected,
        "streams_failed": failed,
        # Tries that failed before their stream's first snapshot, retried (by gRPC status).
        "streams_retries": sum(r.get("retries", 0) for r in readies),
        "streams_retry_causes": _summed(r.get("retry_causes", {}) for r in readies),
        "stream_bytes": (after - before) * 1024 * 1024 / streams,
        "streams_dropped": sum(s["dropped"] for s in statuses),
        "streams_dropped_causes": _summed(s["dropped_causes"] for s in statuses),
        "streams_dropped_phases": losses,
        "streams_moves": sum(s["moves"] for s in statuses),
        "streams_live": sum(s["live"] for s in statuses),
        "refresh": refresh,
        "watch_events_per_s": count / seconds,
        "watch_events_per_cpu_s": count / cpu if cpu else 0.0,
        "fanout": watched,
        **({"lifecycle": lifecycle} if lifecycle else {}),
    }


async def _stream_lifecycle(
    server: _Server, clients, size: int, options, *, wait: float = 600.0
) -> dict:
    """The watch-event rate of a rollout (see the notes): ``lifecycle_pods`` pods added (not
    measured), then replaced by as many new ones, each pod through the events the real control
    plane writes, until the server has taken every event and each state change has reached
    its node's stream (the simulated agents check which stream); then the new pods removed."""
    from bench import kubeproc

    count, nodes, kube = options.lifecycle_pods, options.scale_nodes, server.kube
    await kube.add(count)  # the pods the rollout replaces
    await _until_indexed(server, size + count)
    await asyncio.sleep(2.0)  # their states delivered to the streams, before the clock starts
    work = Path(tempfile.mkdtemp(prefix="podiam-bench-lifecycle-"))
    paths = [work / f"arrivals-{k}.json" for k in range(len(clients))]
    old, new = size, size + count  # the pods' numbers (bench/kubeproc.py)
    for client, path in zip(clients, paths, strict=True):
        client.stdin.write(f"lifecycle {old} {new} {count} {nodes} {path} {wait}\n".encode())
        await client.stdin.drain()
    await asyncio.gather(*(_line(c, b"following", 60) for c in clients))
    rate, rolled, followed = await _timed_rollout(
        server,
        count,
        wait=wait,
        during=lambda: asyncio.gather(*(_line(c, b"followed", wait + 60) for c in clients)),
    )
    # Delivery: from the moment the API server had written a wave's change (new pods started,
    # old pods deleted) to its arrival at the node's stream.
    written: dict[str, float] = {}
    for j in range(count):
        running, deleted = rolled["waves"][j // ROLLOUT_WAVE]
        written[kubeproc.pod_ip(new + j)] = running
        written[kubeproc.pod_ip(old + j)] = deleted
    latencies = []
    for path in paths:
        arrivals = json.loads(await asyncio.to_thread(path.read_text))
        latencies += [arrived - written[ip] for ip, arrived in arrivals.items()]
    latencies.sort()
    await kube.remove(count)
    await _until_indexed(server, size)
    return {
        **rate,
        "state_changing": sum(f["states"] + f["removals"] for f in followed),
        "missing": sum(f["missing"] for f in followed),
        "lost": sum(f["lost"] for f in followed),  # on streams that ended meanwhile
        "misrouted": sum(f["misrouted"] for f in followed),
        "updates": sum(f["updates"] for f in followed),
        "delivery_p50_ms": procs.percentile(latencies, 0.5) * 1000,
        "delivery_p99_ms": procs.percentile(latencies, 0.99) * 1000,
    }


async def _lifecycle_rate(server: _Server, size: int, count: int) -> dict:
    """``_stream_lifecycle`` without node streams: until the server has taken every event."""
    await server.kube.add(count)
    await _until_indexed(server, size + count)
    rate, _, _ = await _timed_rollout(server, count)
    await server.kube.remove(count)
    await _until_indexed(server, size)
    return rate


async def _timed_rollout(
    server: _Server,
    count: int,
    *,
    wait: float = 600.0,
    during: Callable[[], Awaitable[Any]] | None = None,
) -> tuple[dict, dict, Any]:
    """A rollout of ``count`` pods, timed (and profiled, when profiling) until the server has
    taken every event, those that changed no node's state too; ``during`` is awaited within
    the timing, once the API server has written the rollout. Returns the rate, what the API
    server reported of its writing, and what ``during`` gave."""
    profilers = await _profile_phase(server, "lifecycle")
    async with aiohttp.ClientSession() as session:
        seen = await _pod_events(server, session)
        started = time.perf_counter()
        cpu_started = procs.cpu_seconds(server.process.pid)
        rolled = await server.kube.rollout(count)
        result = await during() if during is not None else None
        deadline = time.perf_counter() + wait
        while (events := await _pod_events(server, session) - seen) < rolled["events"]:
            if time.perf_counter() > deadline:
                raise RuntimeError("the server did not take every event of the rollout")
            await asyncio.sleep(0.01)
        seconds = time.perf_counter() - started
        cpu = procs.cpu_seconds(server.process.pid) - cpu_started
    await _stop_profilers(profilers)
    rate = {
        "events": events,
        "written": rolled["events"],
        "written_s": rolled["seconds"],  # the API server's writing of them, in its own loop
        "seconds": seconds,
        "events_per_s": events / seconds,
        "events_per_cpu_s": events / cpu if cpu else 0.0,
    }
    return rate, rolled, result


async def _stop_profilers(profilers) -> None:
    for profiler in profilers:
        profiler.send_signal(signal.SIGINT)
        await profiler.wait()


async def _profile_phase(server: _Server, phase: str) -> list:
    """py-spy on the server and the API server over one phase, when profiling."""
    if server.profile is None:
        return []
    profilers = []
    for pid, name in ((server.process.pid, "server"), (server.kube.process.pid, "kubeapi")):
        out = server.profile.with_name(f"{server.profile.name}-{phase}-{name}.txt")
        profilers.append(await _profiler(pid, out))
    await asyncio.sleep(0.5)
    return profilers


async def _pod_events(server: _Server, session: aiohttp.ClientSession) -> int:
    """The pod watch events (ADDED, MODIFIED, DELETED) the server has taken so far."""
    async with session.get(f"http://127.0.0.1:{server.metrics_port}/metrics") as response:
        text = await response.text()
    return int(sum(float(value) for value in _POD_EVENTS.findall(text)))


async def _until_indexed(server: _Server, pods: int) -> None:
    async with aiohttp.ClientSession() as session:
        deadline = time.perf_counter() + 600
        while await server.metric(session, "podiam_pods_indexed") != pods:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"the server did not reach {pods:,} pods indexed")
            await asyncio.sleep(0.05)


def _check_losses(section: Section, row: dict) -> None:
    """Streams lost after their snapshot: none may be outside the connect storm (refresh, watch
    burst, removal), where every agent is connected and a loss would be a real agent's too;
    those within it are measured, each reconnected (see the README on keepalive under a connect
    storm), and every node must end the run with a live stream."""
    causes = row.get("streams_dropped_causes", {})
    phases = row.get("streams_dropped_phases", {})
    in_storm = phases.get("connect storm", 0)
    outside = sum(phases.values()) - in_storm
    pings = sum(n for cause, n in causes.items() if "too_many_pings" in cause.lower())
    top = "; ".join(
        f"{n:,} {cause}" for cause, n in sorted(causes.items(), key=lambda i: -i[1])[:3]
    )
    where = "; ".join(f"{name} {n:,}" for name, n in phases.items() if name != "connect storm")
    section.check(
        "node streams lost after their snapshot, outside the connect storm (pings every 5 s)",
        "0 (none for too_many_pings)",
        f"{outside:,} ({pings:,} too_many_pings)"
        + (f": {where}" if where else "")
        + f"; {row.get('streams_moves', 0):,} moves at a GOAWAY",
        outside == 0 and pings == 0,
    )
    streams, live = row["streams"], row.get("streams_live", 0)
    section.check(
        "node streams lost during the connect storm, each reconnected",
        "measured; every node live at the end",
        f"{in_storm:,}"
        + (f" ({top})" if top else "")
        + f"; {live:,} of {streams:,} live at the end",
        live == streams - row.get("streams_failed", 0),
    )


def _agent_processes(options) -> int:
    return getattr(options, "scale_agent_processes", None) or AGENT_PROCESSES


def by_phase(phases: list[tuple[str, float]], times) -> dict[str, int]:
    """How many of ``times`` (time.time()) fell in each phase (a phase lasts until the next
    begins)."""
    counts = {name: 0 for name, _ in phases}
    for moment in times:
        within = [name for name, began in phases if began <= moment]
        counts[within[-1] if within else phases[0][0]] += 1
    return {name: n for name, n in counts.items() if n}


def _cpu_per_call_us(result: dict) -> float:
    """The served process's CPU µs per call over a unary run (procs.generate's served_cpu is
    CPU seconds per second)."""
    cps = result.get("cps") or 0.0
    return result.get("served_cpu", 0.0) / cps * 1e6 if cps else 0.0


def _summed(counts) -> dict[str, int]:
    total: dict[str, int] = {}
    for count in counts:
        for key, value in count.items():
            total[key] = total.get(key, 0) + value
    return total


async def _tell(clients, command: str) -> None:
    for client in clients:
        client.stdin.write(command.encode() + b"\n")
        await client.stdin.drain()


async def _refresh_delivery(server: _Server, clients, phases: list) -> dict:
    """The next round of refreshes, from each new set's announcement in the server's log to its
    arrival on every stream that holds its identity (see the note on refresh delivery)."""
    work = Path(tempfile.mkdtemp(prefix="podiam-bench-refresh-"))
    # Armed between rounds (a round spreads over the STS budget's seconds), so that every
    # stream waits for the same round.
    deadline = time.perf_counter() + REFRESH_WAIT
    while time.perf_counter() < deadline:
        latest = max(server.obtained.values(), default=0.0)
        if time.time() - latest > REFRESH_QUIET:
            break
        await asyncio.sleep(0.5)
    paths = [work / f"arrivals-{k}.json" for k in range(len(clients))]
    phases.append(("refresh round", time.time()))
    for client, path in zip(clients, paths, strict=True):
        client.stdin.write(f"refresh {REFRESH_WAIT} {path}\n".encode())
        await client.stdin.drain()
    answers = await asyncio.gather(*(_line(c, b"refreshed", REFRESH_WAIT + 60) for c in clients))
    announced = dict(server.obtained)
    per_node, firsts, lasts, unknown = [], [], [], 0
    for path in paths:
        found = json.loads(await asyncio.to_thread(path.read_text))
        for arrivals in found.values():
            if not arrivals:
                continue
            delays = []
            for access_key, arrived in arrivals:
                if access_key not in announced:
                    unknown += 1
                    continue
                delays.append(arrived - announced[access_key])
                firsts.append(announced[access_key])
                lasts.append(arrived)
            if delays:
                per_node.append(max(delays))
    per_node.sort()
    return {
        "streams": sum(a["streams"] for a in answers),
        "waiting": sum(a["waiting"] for a in answers),
        "unannounced": unknown,
        "nodes": len(per_node),
        "p50_ms": procs.percentile(per_node, 0.5) * 1000,
        "p99_ms": procs.percentile(per_node, 0.99) * 1000,
        "max_ms": per_node[-1] * 1000 if per_node else 0.0,
        "all_nodes_s": max(lasts) - min(firsts) if lasts else 0.0,
    }


def _log_time(stamp: str) -> float:
    from datetime import datetime

    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


async def _line(process, prefix: bytes, seconds: float) -> dict:
    line = await asyncio.wait_for(process.stdout.readline(), seconds)
    if not line.startswith(prefix):
        raise RuntimeError(f"simulated agents: expected {prefix!r}, got {line!r}")
    rest = line[len(prefix) :].strip()
    return json.loads(rest) if rest else {}


def _add_row(table, row: dict) -> None:
    alone = f"{row['api_alone_s']:.1f}" if row.get("api_alone_s") else "—"
    watch_alone = row.get("api_watch_alone_per_s")
    watch_alone = f"{watch_alone:,.0f}" if watch_alone else "—"
    if not row["pods"]:
        table.add(0, row["server"], alone, watch_alone, row["sync_s"], row["sync_cpu_s"],
                  row["start_s"], row["rss_mb"], row["peak_rss_mb"], *["—"] * 26)  # fmt: skip
        return
    unary, bare = row["unary"], row["bare"]
    table.add(
        row["pods"], row["server"], alone, watch_alone, row["sync_s"], row["sync_cpu_s"],
        row["start_s"],
        row["rss_mb"], row["peak_rss_mb"], row["per_pod_bytes"], row.get("streams", "—"),
        row.get("streams_failed", "—"), _dropped_cell(row),
        row.get("streams_retries", "—"),
        row.get("streams_connect_s", "—"),
        f"{row['stream_bytes'] / 1024:.1f}" if "stream_bytes" in row else "—",
        *_refresh_cells(row.get("refresh")),
        *_fanout_cells(row.get("fanout")),
        row["watch_events_per_s"], row.get("watch_events_per_cpu_s", "—"), unary["cps"],
        bare["cps"], f"{row['unary_ratio']:.2f}x",
        " ".join(f"{r['ratio']:.2f}" for r in row.get("unary_rounds", ())),
        unary["p99_ms"], bare["p99_ms"], f"{unary['served_cpu']:.2f}",
        *_cpu_cells(row.get("unary_rounds")),
    )  # fmt: skip


def _add_mix_rows(table, row: dict, options) -> None:
    """The two watch-event mixes of one size: the burst (every event changes a node's state)
    and the rollout (each pod's lifecycle, as the real control plane writes it)."""
    if not row["pods"]:
        return
    fanout = row.get("fanout")
    burst = "pods added Running (each event changes a node's state)"
    if row.get("watch_events_per_s"):
        table.add(
            row["pods"], row["server"], burst, options.watch_events, options.watch_events,
            row.get("api_watch_alone_per_s") or "—", "—",
            options.watch_events / row["watch_events_per_s"], row["watch_events_per_s"],
            row.get("watch_events_per_cpu_s", "—"), *_mix_fanout_cells(fanout, options),
        )  # fmt: skip
    lifecycle = row.get("lifecycle")
    if lifecycle:
        table.add(
            row["pods"], row["server"], "pod lifecycle (rollout)", lifecycle["events"],
            lifecycle.get("state_changing", "—"), row.get("api_lifecycle_alone_per_s") or "—",
            lifecycle["written_s"], lifecycle["seconds"], lifecycle["events_per_s"],
            lifecycle["events_per_cpu_s"],
            lifecycle.get("updates", "—"), lifecycle.get("delivery_p50_ms", "—"),
            lifecycle.get("delivery_p99_ms", "—"), lifecycle.get("misrouted", "—"),
            _missing_cell(lifecycle),
        )  # fmt: skip


def _missing_cell(lifecycle: dict):
    """Missing arrivals, and those no longer awaited because their stream ended meanwhile."""
    missing, lost = lifecycle.get("missing", "—"), lifecycle.get("lost")
    return f"{missing:,} (+{lost:,} on streams that ended)" if lost else missing


def _mix_fanout_cells(fanout: dict | None, options) -> list:
    if not fanout:
        return ["—"] * 5
    return [fanout["updates"], fanout["delivery_p50_ms"], fanout["delivery_p99_ms"],
            fanout["misrouted"], options.watch_events - fanout["delivered"]]  # fmt: skip


def _dropped_cell(row: dict):
    """The streams lost after their snapshot, and in which phases (each one reconnected)."""
    if "streams_dropped" not in row:
        return "—"
    phases = row.get("streams_dropped_phases") or {}
    where = ", ".join(f"{name} {n:,}" for name, n in phases.items())
    return f"{row['streams_dropped']:,}" + (f" ({where})" if where else "")


def _cpu_cells(rounds: list[dict] | None) -> list:
    """The median over the rounds of the server's and the bare servicer's CPU µs per call."""
    if not rounds:
        return ["—", "—"]
    return [procs.percentile(sorted(r[key] for r in rounds), 0.5)
            for key in ("cpu_us", "bare_cpu_us")]  # fmt: skip


def _fanout_cells(fanout: dict | None) -> list:
    if not fanout:
        return ["—"] * 4
    return [fanout["misrouted"], fanout["updates"], fanout["delivery_p50_ms"],
            fanout["delivery_p99_ms"]]  # fmt: skip


def _refresh_cells(refresh: dict | None) -> list:
    if not refresh or not refresh["nodes"]:
        return ["—"] * 4
    return [refresh["p50_ms"], refresh["p99_ms"], refresh["max_ms"], refresh["all_nodes_s"]]


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
        rate = count / (time.perf_counter() - started)
        await kube.remove(count)
        while await server.metric(session, "podiam_pods_indexed") > size:
            if time.perf_counter() - started > 600:
                raise RuntimeError("the server did not drop the removed pods")
            await asyncio.sleep(0.05)
        return rate
