"""Server scale against a real control plane: kube-apiserver, etcd, the controller manager, the
scheduler and kwok's fake nodes (tests/support/controlplane.py), with pods created through the
API server and started by kwok (an IP from the node's pod CIDR, ``Running``), side by side with
the Kubernetes API test double (bench/kubeproc.py) holding the same pods on the same nodes.

For each size (nodes by pods per node) and each API: podiam-server's initial sync, resident
memory, watch events processed per second, and the node-stream fan-out — one WatchNode stream
per node from simulated agents (bench/node_agents.py) — as the time until every stream has its
snapshot and until new pods reached their nodes' streams.

What differs from a cluster of that size, and why: kwok's nodes renew no leases and the
controller manager runs without its node-lifecycle controller (on two shared cores, thousands
of nodes' heartbeats would be most of the API server's work, and none of podiam's); pods are
created bound to their node (``spec.nodeName``), as the scheduler's binding would leave them;
the server uses the token of the chart's own ServiceAccount, so its requests go through the API
server's priority and fairness as on a cluster; and it runs with ``--no-node-binding``,
because every simulated agent connects from 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench import kubeproc, procs
from bench.report import Section
from bench.serverproc import ServerProcess
from certs.authority import generate_bundle, write_bundle
from tests.support.moto_sts import MotoSts

ROLES = 50
NAMESPACES = kubeproc.NAMESPACES
CREATE_CONCURRENCY = 64  # requests in flight while creating objects
STREAMS_PER_CHANNEL = 10  # the simulated agents' streams share a connection per this many
TIMEOUT = 3600.0  # seconds for any one phase; a real API server here is slow, not stuck
# kwok plays each stage for 4 objects at a time by default: pods would start at tens per second.
_KWOK_CONFIG = """\
apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokConfiguration
options:
  podPlayStageParallelism: 32
  nodePlayStageParallelism: 16
"""


@dataclass(frozen=True)
class Size:
    nodes: int
    per_node: int

    @property
    def pods(self) -> int:
        return self.nodes * self.per_node

    def __str__(self) -> str:
        return f"{self.nodes:,} nodes x {self.per_node}"


def parse_sizes(text: str) -> list[Size]:
    """``1000x110,5000x22``: nodes by pods per node."""
    sizes = []
    for part in text.split(","):
        if part.strip():
            nodes, _, per_node = part.strip().partition("x")
            sizes.append(Size(int(nodes), int(per_node)))
    return sizes


def problem() -> str:
    """Why the section cannot run here, or ''."""
    from tests.support.controlplane import binaries_dir, missing_binaries

    missing = missing_binaries(binaries_dir())
    return (
        f"control plane not built ({', '.join(missing)}): run tests/controlplane/build.sh"
        if missing
        else ""
    )


def _say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# The real control plane, loaded.


class RealApi:
    """A control plane of its own for one size: started, filled, measured, stopped."""

    def __init__(self, size: Size, work: Path) -> None:
        from tests.support.controlplane import ControlPlane, binaries_dir

        self.size = size
        self.work = work
        bin_dir = binaries_dir()
        work.mkdir(parents=True, exist_ok=True)
        kwok_config = work / "kwok-scale.yaml"
        kwok_config.write_text(_KWOK_CONFIG)
        self.plane = ControlPlane(
            bin_dir,
            work / "plane",
            nodes=0,
            component_args={
                # 110k pods and their status updates outgrow etcd's default 2 GiB quota.
                "etcd": ["--quota-backend-bytes", str(8 << 30)],
                "kube-controller-manager": ["--controllers", "*,-node-lifecycle-controller"],
                "kwok": ["--node-lease-duration-seconds", "0", "--config", str(kwok_config)],
            },
            # Audit every request about pods? Not at this size: nothing reads the log here.
            apiserver_args=["--audit-log-path", ""],
        )
        self.kubeconfig: Path | None = None
        self.figures: dict[str, float] = {}
        self._admin = None
        self._created = 0

    def start(self) -> None:
        # Synchronously, from the main thread: the components die with the thread that
        # started them (see tests/support/controlplane.py).
        from tests.support.clusters import install_chart_rbac

        started = time.perf_counter()
        self.plane.start()
        self.figures["start_s"] = time.perf_counter() - started
        access = install_chart_rbac(self.plane)
        self.kubeconfig = self.plane.kubeconfig("podiam-server", token=access.server_token)

    async def fill(self) -> None:
        from tests.support.controlplane import admin_client

        self._admin = admin_client(self.plane)
        nodes = self.size.nodes
        started = time.perf_counter()
        await self._many("POST", "/api/v1/namespaces", (_namespace(n) for n in range(NAMESPACES)))
        await self._many("POST", "/api/v1/nodes", (_node(n) for n in range(nodes)))
        await self._until(self._nodes_ready, "kwok reports every node Ready")
        # kwok gives each node its one --node-ip; each node gets its own address instead (the
        # host IP of its pods, by which the server groups them into node streams).
        await self._many(
            "PATCH",
            (f"/api/v1/nodes/{_node_name(n)}/status" for n in range(nodes)),
            ({"status": {"addresses": [{"type": "InternalIP", "address": kubeproc.node_ip(n)}]}}
             for n in range(nodes)),
        )  # fmt: skip
        self.figures["nodes_s"] = time.perf_counter() - started
        await self._until(self._service_accounts, "every namespace's default ServiceAccount")
        _say(f"real API: {nodes:,} nodes ready; creating {self.size.pods:,} pods")
        created, running = await self.add(self.size.pods)
        self.figures["create_per_s"] = self.size.pods / created
        self.figures["running_per_s"] = self.size.pods / running
        self.figures["fill_s"] = running

    async def add(self, count: int) -> tuple[float, float]:
        """Create ``count`` pods, spread over the nodes; return the seconds until all were
        created and until kwok had them all Running."""
        first = self._created
        self._created += count
        started = time.perf_counter()
        await self._many(
            "POST",
            (f"/api/v1/namespaces/{_namespace_name(k)}/pods" for k in range(first, first + count)),
            (_pod(k, self.size.nodes) for k in range(first, first + count)),
        )
        created = time.perf_counter() - started
        await self._until(self._all_running, "kwok starts every pod", interval=1.0)
        return created, time.perf_counter() - started

    def stop(self) -> None:
        self.plane.stop()

    async def close(self) -> None:
        if self._admin is not None:
            await self._admin.close()

    def rss_mb(self) -> dict[str, float]:
        return {c.name: procs.rss_mb(c.pid)[0] for c in self.plane.components if c.running()}

    # --- plumbing ---------------------------------------------------------------------------

    async def _many(self, method: str, paths, bodies) -> None:
        """One request per (path, body), ``CREATE_CONCURRENCY`` at a time; a path that is a
        str is the same for every body."""
        limit = asyncio.Semaphore(CREATE_CONCURRENCY)
        content = "application/merge-patch+json" if method == "PATCH" else "application/json"

        async def one(path: str, body: Any) -> None:
            async with limit:
                answer = await self._admin.request(method, path, body, content_type=content)
            if not answer.ok:
                raise RuntimeError(f"{method} {path}: HTTP {answer.status}: {answer.body}")

        if isinstance(paths, str):
            pairs = ((paths, body) for body in bodies)
        else:
            pairs = zip(paths, bodies, strict=True)
        pending: set[asyncio.Task] = set()
        for path, body in pairs:
            # Bounded: tasks for 100k pods at once would hold every body in memory.
            while len(pending) >= CREATE_CONCURRENCY * 4:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
            pending.add(asyncio.create_task(one(path, body)))
        for task in asyncio.as_completed(pending):
            await task

    async def _until(self, check: Callable[[], Awaitable[bool]], what: str, interval=0.5) -> None:
        deadline = time.perf_counter() + TIMEOUT
        while not await check():
            if time.perf_counter() > deadline:
                raise RuntimeError(f"real API: not in time: {what}")
            await asyncio.sleep(interval)

    async def _nodes_ready(self) -> bool:
        # Only the nodes that are not Ready, one page: cheap at any size.
        answer = await self._admin.get("/api/v1/nodes", limit="500")
        items = answer.body.get("items", [])
        ready = sum(1 for n in items if _is_ready(n))
        if ready < len(items):
            return False
        remaining = answer.body.get("metadata", {}).get("remainingItemCount", 0)
        if remaining or answer.body.get("metadata", {}).get("continue"):
            return await self._count_ready_nodes() == self.size.nodes
        return len(items) == self.size.nodes

    async def _count_ready_nodes(self) -> int:
        answer = await self._admin.get("/api/v1/nodes")
        return sum(1 for n in answer.body.get("items", []) if _is_ready(n))

    async def _service_accounts(self) -> bool:
        answer = await self._admin.get(
            "/api/v1/serviceaccounts", fieldSelector="metadata.name=default"
        )
        names = {a["metadata"]["namespace"] for a in answer.body.get("items", [])}
        return all(_namespace_name(n) in names for n in range(NAMESPACES))

    async def _all_running(self) -> bool:
        answer = await self._admin.get(
            "/api/v1/pods", fieldSelector="status.phase!=Running", limit="1"
        )
        return answer.ok and not answer.body.get("items")


def _is_ready(node: dict) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True"
        for c in node.get("status", {}).get("conditions", [])
    )


def _namespace_name(k: int) -> str:
    return f"ns-{k % NAMESPACES}"


def _node_name(n: int) -> str:
    return f"node-{n}"


def _namespace(n: int) -> dict:
    return {
        "metadata": {
            "name": f"ns-{n}",
            "annotations": {"iam.amazonaws.com/permitted": ".*"},
        }
    }


def _node(n: int) -> dict:
    from tests.support.controlplane import KWOK_NODE_ANNOTATION

    cidr = f"10.{64 + n // 256}.{n % 256}.0/24"  # kwok hands out pod IPs from it
    return {
        "metadata": {
            "name": _node_name(n),
            "annotations": {KWOK_NODE_ANNOTATION: "fake"},
            "labels": {"kubernetes.io/hostname": _node_name(n), "type": "kwok"},
        },
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
    }


def _pod(k: int, nodes: int) -> dict:
    role = f"app-{k % ROLES}"
    return {
        "metadata": {
            "name": f"pod-{k}",
            "annotations": {
                "iam.amazonaws.com/role": role,
                "iam.amazonaws.com/session-name": role,
            },
        },
        "spec": {
            "nodeName": _node_name(k % nodes),
            "automountServiceAccountToken": False,
            "containers": [{"name": "app", "image": "podiam.test/app:none"}],
        },
    }


# --------------------------------------------------------------------------------------------
# The test double, loaded with the same pods.


class DoubleApi:
    def __init__(self, size: Size, work: Path) -> None:
        self.size = size
        self.kubeconfig = work / f"double-{size.nodes}x{size.per_node}.kubeconfig"
        self.process: asyncio.subprocess.Process | None = None
        self.figures: dict[str, float] = {}

    async def start(self) -> None:
        started = time.perf_counter()
        self.process = await procs.spawn(
            [
                "-m", "bench.kubeproc", "--pods", str(self.size.pods),
                "--nodes", str(self.size.nodes), "--roles", str(ROLES), "--local-pods", "0",
                "--kubeconfig", str(self.kubeconfig),
            ],
            core=procs.cpu(procs.LOAD_CPU),
            stdin=asyncio.subprocess.PIPE,
        )  # fmt: skip
        line = await asyncio.wait_for(self.process.stdout.readline(), TIMEOUT)
        if not line.startswith(b"ready"):
            raise RuntimeError("the Kubernetes API test double did not start")
        self.figures["fill_s"] = time.perf_counter() - started

    async def add(self, count: int) -> tuple[float, float]:
        started = time.perf_counter()
        self.process.stdin.write(f"add {count}\n".encode())
        await self.process.stdin.drain()
        line = await asyncio.wait_for(self.process.stdout.readline(), TIMEOUT)
        if not line.startswith(b"added"):
            raise RuntimeError("the Kubernetes API test double did not add pods")
        seconds = time.perf_counter() - started
        return seconds, seconds

    async def stop(self) -> None:
        await procs.stop(self.process)


# --------------------------------------------------------------------------------------------
# podiam-server and its simulated agents.


class Server(ServerProcess):
    """podiam-server as its own process, with no startup taint to manage and its audit log
    to a file of its own."""

    def __init__(self, kubeconfig: Path, sts: MotoSts, tls: Path) -> None:
        self.audit_log = tls.parent / f"audit-{procs.free_port()}.log"
        args = [
            "--no-node-binding", "--startup-taint", "",
            # One audit line per pod per stream: to a file, as a pipe this process reads at its
            # own pace would slow the server down to it.
            "--audit-log", str(self.audit_log),
        ]  # fmt: skip
        super().__init__(kubeconfig, sts, tls, args=args, start_timeout=TIMEOUT)


class Agents:
    """bench/node_agents.py: one WatchNode stream per node."""

    def __init__(self, server: Server, tls: Path, host_ips: list[str], expect: int) -> None:
        self.spec = {
            "target": f"localhost:{server.port}",
            "tls": str(tls),
            "host_ips": host_ips,
            "channels": -(-len(host_ips) // STREAMS_PER_CHANNEL),
            "expect": expect,
            "cpu": procs.cpu(procs.LOAD_CPU),
        }
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.process = await procs.spawn(
            ["-m", "bench.node_agents"],
            core=procs.cpu(procs.LOAD_CPU),
            stdin=asyncio.subprocess.PIPE,
        )
        self.process.stdin.write(json.dumps(self.spec).encode() + b"\n")
        await self.process.stdin.drain()

    async def next(self, key: str) -> dict:
        line = await asyncio.wait_for(self.process.stdout.readline(), TIMEOUT)
        if not line:
            raise RuntimeError("the simulated agents ended")
        said = json.loads(line)
        if key not in said:
            raise RuntimeError(f"the simulated agents said {said}, not {key}")
        return said

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.stdin.close()
        await procs.stop(self.process)


async def measure(
    api_name: str,
    kubeconfig: Path,
    size: Size,
    add: Callable[[int], Awaitable[tuple[float, float]]],
    sts: MotoSts,
    tls: Path,
    watch_events: int,
) -> dict[str, Any]:
    """Start podiam-server against the loaded API, then the agents; add ``watch_events`` pods."""
    server = Server(kubeconfig, sts, tls)
    agents = None
    try:
        await server.start()
        await asyncio.sleep(1.0)
        rss, peak = procs.rss_mb(server.process.pid)
        row: dict[str, Any] = {
            "api": api_name,
            "sync_s": server.marks["synced"] - server.marks["listing"],
            "start_s": server.marks["serving"] - server.marks["spawn"],
            "rss_mb": rss,
            "peak_rss_mb": peak,
        }
        host_ips = [kubeproc.node_ip(n) for n in range(size.nodes)]
        agents = Agents(server, tls, host_ips, watch_events)
        opened = time.time()
        await agents.start()
        snapshots = await agents.next("snapshots")
        row["streams"] = snapshots["streams"]
        row["snapshot_pods"] = snapshots["pods"]
        row["snapshots_s"] = snapshots["snapshots"] - opened
        row["stream_retries"] = sum(snapshots.get("retries", {}).values())
        async with aiohttp.ClientSession() as session:
            row["node_streams_metric"] = await server.metric(session, "podiam_node_streams")
            row["rss_streams_mb"] = procs.rss_mb(server.process.pid)[0]
            if watch_events:
                indexed = await server.metric(session, "podiam_pods_indexed")
                started, wall = time.perf_counter(), time.time()
                adding = asyncio.create_task(add(watch_events))
                while await server.metric(session, "podiam_pods_indexed") < indexed + watch_events:
                    if adding.done() and adding.exception():
                        adding.result()
                    if time.perf_counter() - started > TIMEOUT:
                        raise RuntimeError("the server did not index the added pods")
                    await asyncio.sleep(0.05)
                indexed_s = time.perf_counter() - started
                created_s, _running_s = await adding
                delivered = await agents.next("delivered")
                row["watch_events_per_s"] = watch_events / indexed_s
                row["api_create_per_s"] = watch_events / created_s
                row["delivered_s"] = delivered["delivered"] - wall
                row["delivered_pods"] = delivered["pods"]
        row["server_log_tail"] = list(server.log)[-3:]
        return row
    except BaseException:
        _say("podiam-server's last log lines:\n" + "\n".join(list(server.log)[-15:]))
        raise
    finally:
        if agents is not None:
            await agents.stop()
        await server.stop()


# --------------------------------------------------------------------------------------------
# The section.


async def run(section: Section, options) -> None:
    sizes = parse_sizes(options.real_scale)
    work = Path(tempfile.mkdtemp(prefix="podiam-bench-real-"))
    tls = work / "tls"
    write_bundle(generate_bundle(), tls)
    sts = MotoSts()
    await asyncio.to_thread(sts.start)
    section.notes += [
        "The real API: kube-apiserver, etcd, kube-controller-manager, kube-scheduler and kwok, "
        "built from source (tests/controlplane/build.sh), a fresh control plane per size. Pods "
        f"are created through the API server ({CREATE_CONCURRENCY} requests in flight, bound "
        "to their node) and started by kwok (IP from the node's pod CIDR, Running); the double "
        "(`tests/support/kubeapi.py`, its own process) holds the same pods on the same nodes.",
        "Not as on a cluster: kwok's nodes renew no leases and the node-lifecycle controller is "
        "off (thousands of heartbeats would be most of the API server's work here, none of "
        "podiam's); every simulated agent connects from 127.0.0.1, so the server runs with "
        "`--no-node-binding`; the agents' streams share a connection per "
        f"{STREAMS_PER_CHANNEL}. On the real API the server uses the chart's ServiceAccount "
        "token (priority and fairness apply).",
        f"pods spread over {NAMESPACES} namespaces, {ROLES} roles with a shared session-name "
        "annotation each. initial sync: `listing namespaces and pods` to `synced` in the server's "
        "log. RSS 1 s after serving, and again with every node's stream open.",
        "snapshots: from starting the simulated agents (a process of their own) until every "
        "stream delivered its snapshot; a stream the server cancelled before its snapshot is "
        "retried after 0.5-2 s, as an agent reconnects, and counted. watch events/s: pods "
        "added after the sync, divided by "
        "the time until `podiam_pods_indexed` counts them — on the real API that includes their "
        "creation through the API server (its rate is shown) and kwok starting them; delivered: "
        "until the agents' streams had them all.",
    ]
    table = section.table(
        "podiam-server, real API server vs test double",
        ["size", "pods", "API", "initial sync s", "RSS MB", "RSS with streams MB", "streams",
         "pods in snapshots", "all snapshots s", "streams refused, retried", "watch events/s",
         "API creates/s",
         "new pods on streams s"],
    )  # fmt: skip
    setup = section.table(
        "real control plane per size",
        ["size", "start s", "nodes ready s", "pods created/s", "pods Running/s", "fill s",
         "apiserver MB", "etcd MB", "kwok MB", "controller-manager MB", "scheduler MB"],
    )  # fmt: skip
    rows: list[dict[str, Any]] = []
    try:
        for size in sizes:
            events = min(options.watch_events, size.pods)
            # A size that fails on one API is reported so, and the run goes on: at these
            # sizes a run is long, and the other figures are still worth having.
            try:
                await _on_double(table, rows, size, sts, tls, work, events)
            except Exception as error:
                section.notes.append(f"{size}, test double: failed: {error!r}")
            try:
                await _on_real(table, setup, rows, size, sts, tls, work, events)
            except Exception as error:
                section.notes.append(f"{size}, real API: failed: {error!r}")
    finally:
        await asyncio.to_thread(sts.stop)
        shutil.rmtree(work, ignore_errors=True)
    section.data["rows"] = rows


async def _on_double(table, rows, size, sts, tls, work, events) -> None:
    _say(f"real scale {size}: test double")
    double = DoubleApi(size, work)
    await double.start()
    try:
        row = await measure("double", double.kubeconfig, size, double.add, sts, tls, events)
    finally:
        await double.stop()
    _add_row(table, rows, size, row, double.figures)


async def _on_real(table, setup, rows, size, sts, tls, work, events) -> None:
    _say(f"real scale {size}: real control plane")
    real = RealApi(size, work / f"real-{size.nodes}x{size.per_node}")
    try:
        real.start()
        await real.fill()
        row = await measure("real", real.kubeconfig, size, real.add, sts, tls, events)
        components = real.rss_mb()
    finally:
        await real.close()
        real.stop()
        shutil.rmtree(real.work, ignore_errors=True)
    row["components_rss_mb"] = components
    _add_row(table, rows, size, row, real.figures)
    f = real.figures
    setup.add(
        str(size), f["start_s"], f["nodes_s"], f["create_per_s"], f["running_per_s"],
        f["fill_s"], components.get("kube-apiserver"), components.get("etcd"),
        components.get("kwok"), components.get("kube-controller-manager"),
        components.get("kube-scheduler"),
    )  # fmt: skip


def _add_row(table, rows: list[dict], size: Size, row: dict, figures: dict) -> None:
    row.update(nodes=size.nodes, per_node=size.per_node, pods=size.pods, api_figures=figures)
    rows.append(row)
    _say("real scale row: " + json.dumps(row, default=str))  # kept in the log, come what may
    table.add(
        str(size), size.pods, row["api"], row["sync_s"], row["rss_mb"], row["rss_streams_mb"],
        row["streams"], row["snapshot_pods"], row["snapshots_s"], row["stream_retries"],
        row.get("watch_events_per_s", "—"),
        row.get("api_create_per_s", "—") if row["api"] == "real" else "—",
        row.get("delivered_s", "—"),
    )  # fmt: skip
