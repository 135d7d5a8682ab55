"""A small Kubernetes-shaped network on one machine, built from network namespaces.

The agent's whole job depends on the network: a pod's packet to 169.254.169.254 must cross its
node's ``nat PREROUTING`` chain, be DNATed to the agent on the node's IP, and arrive with the
pod's own IP as its source. None of that can be shown with loopback sockets, so end-to-end tests
build this instead (every address below is fixed by a simple rule, no allocation tables):

    root namespace (pytest; in-process test servers)         10.200.L.254/24 on pdm<pid>r<n>
        │ veth
    <run>-lan: bridge br0 ──────────┬──────────────────┐
                                    │ veth (lan0)      │ veth (lan0)
    <run>-<node> (ip_forward=1)   10.200.L.1/24      10.200.L.2/24        L = Cluster.lan
        │ veth eni<11 hex> (node side) / eth0 (pod side)
    <run>-<node>-<pod>            10.201.1.1/32, 10.201.1.2/32, ... (node k: 10.201.k.0/24)

- Node k (k = 1, 2, ... in creation order) is ``10.200.L.k``: the agent's ``--host`` and the
  pods' ``status.hostIP``. Nodes reach each other and the root namespace over the bridge.
- Pod p on node k is ``10.201.k.p``. The node routes it with a /32 through the pod's veth, whose
  node-side name is ``eni`` + 11 hex digits (as the AWS VPC CNI names them), so ``eni+`` is the
  agent's ``--host-interface``. The pod's default route goes via its node's IP, on-link through
  the veth (the node answers ARP for its own address on any interface).
- Nothing anywhere answers 169.254.169.254 and nodes have no default route: a pod's metadata
  request reaches an agent only through its own node's DNAT rule, and fails fast (ICMP
  unreachable) without one. DNAT to the node's own LAN IP needs no ``route_localnet``.
- Only nodes are routed from the root namespace; pods are reachable from their own node only.
- The root namespace gets one veth onto the bridge, ``Cluster.root_ip`` (10.200.L.254): a test
  server in pytest listening on 0.0.0.0 (or on that address) is reachable from every node, and
  pytest reaches every node's IP. Run anything else (podiam-server, moto) inside a node with
  ``spawn``.

Names embed the creating process's pid and a sequence number, so parallel runs never collide;
``L`` is picked free under a lock file. ``Cluster`` removes every namespace, process and link it
made when closed, even after a failure, and ``sweep`` (called on start) removes what crashed
runs left behind: namespaces and links whose recorded pid no longer exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

LAN_PREFIX = "10.200"  # the LAN is 10.200.<lan>.0/24
POD_PREFIX = "10.201"  # pods of node k are 10.201.<k>.0/24
ROOT_HOST = 254  # the root namespace is 10.200.<lan>.254
DEFAULT_PREFIX = "podiam"
_LOCK_FILE = Path("/run/podiam-netns.lock")
_IP_TIMEOUT = 10.0
_sequence = itertools.count(1)


# ---------------------------------------------------------------- skipping, or failing in CI


def _problem(tools: Sequence[str]) -> str | None:
    """Why network-namespace tests cannot run here, or None if they can."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not running as root")
    missing = [t for t in ("ip", "iptables", *tools) if shutil.which(t) is None]
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    return f"network-namespace test: {'; '.join(problems)}" if problems else None


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def requires_tools(*tools: str) -> pytest.MarkDecorator:
    """Skip unless root with ``ip``, ``iptables`` and ``tools`` on PATH — except under CI=true,
    where nothing is skipped and ``demand`` (called by ``Cluster``) fails the test instead."""
    problem = _problem(tools)
    return pytest.mark.skipif(problem is not None and not _in_ci(), reason=problem or "")


requires_root = requires_tools()


def demand(*tools: str) -> None:
    """At fixture time: skip (or, under CI=true, fail loudly) if the tools are not there."""
    problem = _problem(tools)
    if problem is None:
        return
    if _in_ci():
        pytest.fail(f"CI=true but {problem}", pytrace=False)
    pytest.skip(problem)


# ---------------------------------------------------------------- one namespace


@dataclass(frozen=True, slots=True)
class Fetched:
    """What an HTTP client inside a namespace got: a status and body, or an error."""

    status: int | None
    body: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None


# Runs inside the namespace: one request, no proxies from the environment, redirects returned
# rather than followed (metadata clients care about them), the result as one JSON line.
_FETCH = r"""
import json, sys, urllib.error, urllib.request
url, method, headers, timeout = sys.argv[1:5]
headers, timeout = json.loads(headers), float(timeout)
class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), NoRedirect)
request = urllib.request.Request(url, method=method, headers=headers)
try:
    with opener.open(request, timeout=timeout) as r:
        out = {"status": r.status, "headers": dict(r.headers), "body": r.read().decode()}
except urllib.error.HTTPError as e:
    out = {"status": e.code, "headers": dict(e.headers), "body": e.read().decode()}
except Exception as e:
    out = {"status": None, "error": f"{type(e).__name__}: {e}"}
print(json.dumps(out))
"""

# Runs inside the namespace: answers every GET with "<label> <client ip> <path>".
_ECHO_SERVER = r"""
import http.server, sys
host, port, label = sys.argv[1], int(sys.argv[2]), sys.argv[3]
class Echo(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"{label} {self.client_address[0]} {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer((host, port), Echo)
print("listening", flush=True)
server.serve_forever()
"""


class Netns:
    """A named network namespace (``ip netns``) and the processes started in it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._processes: list[asyncio.subprocess.Process] = []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def argv(self, *argv: str) -> list[str]:
        """``argv`` prefixed to run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self,
        *argv: str,
        check: bool = True,
        env: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace and capture its output (text).

        ``env`` adds to (or overrides in) this process's environment; it does not replace it.
        """
        result = subprocess.run(
            self.argv(*argv),
            capture_output=True,
            text=True,
            env=_environment(env),
            timeout=timeout,
            input=input,
            check=False,
        )
        if check:
            _check(result)
        return result

    async def arun(
        self,
        *argv: str,
        check: bool = True,
        env: Mapping[str, str] | None = None,
        timeout: float = 10.0,  # noqa: ASYNC109 - the child is killed when it expires
    ) -> subprocess.CompletedProcess[str]:
        """``run`` without blocking the event loop (for tests serving from this process)."""
        full = self.argv(*argv)
        proc = await asyncio.create_subprocess_exec(
            *full,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_environment(env),
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            out, err = await proc.communicate()
            raise subprocess.TimeoutExpired(full, timeout, out, err) from None
        result = subprocess.CompletedProcess(
            full, proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")
        )
        if check:
            _check(result)
        return result

    async def spawn(
        self,
        *argv: str,
        env: Mapping[str, str] | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
    ) -> asyncio.subprocess.Process:
        """Start a long-running process inside the namespace; it is stopped on cleanup.

        Output goes where pytest captures it unless ``stdout``/``stderr`` say otherwise
        (``asyncio.subprocess.PIPE`` to read it, e.g. for a "ready" line). The process leads
        its own process group, so cleanup reaches its children too.
        """
        proc = await asyncio.create_subprocess_exec(
            *self.argv(*argv),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=_environment(env),
            start_new_session=True,
        )
        self._processes.append(proc)
        return proc

    async def serve_echo(
        self, host: str, port: int, *, label: str = ""
    ) -> asyncio.subprocess.Process:
        """Start a tiny HTTP server on ``host:port`` answering every GET with
        ``"<label> <client ip> <path>"``; return once it listens."""
        label = label or self.name
        proc = await self.spawn(
            sys.executable, "-c", _ECHO_SERVER, host, str(port), label,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 10)
        if line.strip() != b"listening":
            raise RuntimeError(f"echo server in {self.name} did not start on {host}:{port}")
        return proc

    async def fetch(
        self,
        url: str,
        *,
        method: str = "GET",
        headers: Mapping[str, str] | None = None,
        timeout: float = 2.0,  # noqa: ASYNC109 - handed to the client inside the namespace
    ) -> Fetched:
        """Make one HTTP request from inside the namespace (a separate Python process)."""
        result = await self.arun(
            sys.executable, "-c", _FETCH, url, method, json.dumps(dict(headers or {})),
            str(timeout),
            timeout=timeout + 10,
        )  # fmt: skip
        out = json.loads(result.stdout)
        return Fetched(out["status"], out.get("body", ""), out.get("headers", {}), out.get("error"))

    def sysctl(self, key: str, value: str | int) -> None:
        """Set ``net.*`` sysctl ``key`` (dotted) for this namespace."""
        path = "/proc/sys/" + key.replace(".", "/")
        self.run("sh", "-c", 'printf %s "$2" > "$1"', "sh", path, str(value))

    def read_sysctl(self, key: str) -> str:
        return self.run("cat", "/proc/sys/" + key.replace(".", "/")).stdout.strip()

    async def stop_processes(self, *, grace: float = 2.0) -> None:
        """Stop what ``spawn`` started: SIGTERM, then SIGKILL after ``grace`` seconds."""
        running = [p for p in self._processes if p.returncode is None]
        for proc in running:
            _signal_group(proc.pid, signal.SIGTERM)
        for proc in running:
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                _signal_group(proc.pid, signal.SIGKILL)
                await proc.wait()
        self._processes.clear()

    def kill_all(self) -> None:
        """SIGKILL every process in the namespace (spawned or not)."""
        for proc in self._processes:
            if proc.returncode is None:
                _signal_group(proc.pid, signal.SIGKILL)
        _kill_pids_in(self.name)

    def delete(self) -> None:
        """Kill everything inside and delete the namespace; no error if it is already gone."""
        self.kill_all()
        _ip("netns", "delete", self.name, missing_ok=True)


# ---------------------------------------------------------------- the cluster


class Pod(Netns):
    """A pod: its own namespace, ``eth0`` = ``ip``/32, default route via its node."""

    def __init__(self, node: Node, name: str, index: int, host_interface: str) -> None:
        super().__init__(f"{node.name}-{name}")
        self.node = node
        self.pod_name = name
        self.ip = f"{POD_PREFIX}.{node.index}.{index}"
        # The node-side end of the pod's veth: what --host-interface matches.
        self.host_interface = host_interface


class Node(Netns):
    """A node: a namespace with ``ip`` on the LAN (``lan0``), forwarding on, and its pods."""

    def __init__(self, cluster: Cluster, name: str, index: int) -> None:
        super().__init__(f"{cluster.run_id}-{name}")
        self.cluster = cluster
        self.node_name = name
        self.index = index
        self.ip = f"{LAN_PREFIX}.{cluster.lan}.{index}"
        self.pod_network = ipaddress.IPv4Network(f"{POD_PREFIX}.{index}.0/24")
        self.pods: dict[str, Pod] = {}

    def add_pod(self, name: str, *, host_interface: str | None = None) -> Pod:
        """Create pod ``name`` on this node. ``host_interface`` overrides the node-side veth
        name (default ``eni`` + 11 hex digits of sha1(node/pod), at most 15 characters)."""
        _require_name("pod", name)
        if name in self.pods:
            raise ValueError(f"pod {name!r} already exists on node {self.node_name!r}")
        if len(self.pods) >= 253:
            raise ValueError(f"node {self.node_name!r} is full (253 pods)")
        digest = hashlib.sha1(f"{self.node_name}/{name}".encode()).hexdigest()[:11]
        host_interface = host_interface or f"eni{digest}"
        return self._wire(Pod(self, name, len(self.pods) + 1, host_interface))

    def replace_pod(self, old: Pod, name: str) -> Pod:
        """The CNI gives a deleted pod's IP to a new pod: ``old``'s namespace is deleted (its
        veth and host route go with it) and pod ``name`` gets the same IP behind a new veth."""
        _require_name("pod", name)
        if name in self.pods:
            raise ValueError(f"pod {name!r} already exists on node {self.node_name!r}")
        old.delete()
        index = int(old.ip.rsplit(".", 1)[1])
        digest = hashlib.sha1(f"{self.node_name}/{name}".encode()).hexdigest()[:11]
        return self._wire(Pod(self, name, index, f"eni{digest}"))

    def _wire(self, pod: Pod) -> Pod:
        host_interface = pod.host_interface
        self.cluster._track(pod)
        self.pods[pod.pod_name] = pod
        _ip("netns", "add", pod.name)
        _ip("-n", pod.name, "link", "set", "lo", "up")
        _ip("link", "add", host_interface, "netns", self.name,
            "type", "veth", "peer", "name", "eth0", "netns", pod.name)  # fmt: skip
        _ip("-n", self.name, "link", "set", host_interface, "up")
        _ip("-n", pod.name, "addr", "add", f"{pod.ip}/32", "dev", "eth0")
        _ip("-n", pod.name, "link", "set", "eth0", "up")
        _ip("-n", pod.name, "route", "add", self.ip, "dev", "eth0", "scope", "link")
        _ip("-n", pod.name, "route", "add", "default", "via", self.ip, "dev", "eth0")
        _ip("-n", self.name, "route", "add", f"{pod.ip}/32", "dev", host_interface)
        return pod


class Cluster:
    """Nodes on a bridged LAN, pods behind them, and a way in from the root namespace.

    Use as ``with Cluster() as cluster:`` or ``async with Cluster() as cluster:`` (the async
    form stops spawned processes gracefully), or call ``start()`` and ``close()``/``aclose()``.
    ``lan`` picks the LAN (10.200.<lan>.0/24); by default a free one is chosen.
    """

    def __init__(self, *, prefix: str = DEFAULT_PREFIX, lan: int | None = None) -> None:
        _require_name("prefix", prefix)
        self.prefix = prefix
        seq = next(_sequence)
        self.run_id = f"{prefix}-{os.getpid()}-{seq}"
        self.root_interface = f"pdm{os.getpid()}r{seq}"[:15]
        self._wanted_lan = lan
        self.lan = 0  # set by start()
        self.root_ip = ""  # set by start()
        self.lan_ns = Netns(f"{self.run_id}-lan")
        self.nodes: dict[str, Node] = {}
        self._created: list[Netns] = []  # in creation order; deleted in reverse
        self._root_link = False
        self._started = False

    def __repr__(self) -> str:
        return f"Cluster({self.run_id!r}, lan={self.lan_network})"

    @property
    def lan_network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"{LAN_PREFIX}.{self.lan}.0/24")

    @property
    def namespaces(self) -> list[str]:
        """Every namespace this cluster created and has not yet deleted."""
        return [ns.name for ns in self._created]

    def start(self) -> Cluster:
        demand()
        if self._started:
            return self
        self._started = True
        sweep(self.prefix)
        try:
            self._track(self.lan_ns)
            _ip("netns", "add", self.lan_ns.name)
            _ip("-n", self.lan_ns.name, "link", "set", "lo", "up")
            _ip("-n", self.lan_ns.name, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.lan_ns.name, "link", "set", "br0", "up")
            with _lan_lock():
                self.lan = _free_lan(self._wanted_lan)
                self.root_ip = f"{LAN_PREFIX}.{self.lan}.{ROOT_HOST}"
                self._root_link = True
                _ip("link", "add", self.root_interface,
                    "type", "veth", "peer", "name", "root", "netns", self.lan_ns.name)  # fmt: skip
                # The alias records the owner so ``sweep`` can tell a crashed run's link.
                _ip("link", "set", self.root_interface, "alias", self.run_id)
                _ip("addr", "add", f"{self.root_ip}/24", "dev", self.root_interface)
                _ip("link", "set", self.root_interface, "up")
            _ip("-n", self.lan_ns.name, "link", "set", "root", "master", "br0", "up")
        except BaseException:
            self.close()
            raise
        return self

    def node(self, name: str) -> Node:
        """Node ``name``, created on first use: 10.200.<lan>.k for the k-th node."""
        if not self._started:
            raise RuntimeError("start the cluster first")
        if name in self.nodes:
            return self.nodes[name]
        _require_name("node", name)
        if len(self.nodes) >= ROOT_HOST - 1:
            raise ValueError("the LAN is full")
        node = Node(self, name, len(self.nodes) + 1)
        self._track(node)
        self.nodes[name] = node
        _ip("netns", "add", node.name)
        _ip("-n", node.name, "link", "set", "lo", "up")
        port = f"n{node.index}"
        _ip("link", "add", "lan0", "netns", node.name,
            "type", "veth", "peer", "name", port, "netns", self.lan_ns.name)  # fmt: skip
        _ip("-n", self.lan_ns.name, "link", "set", port, "master", "br0", "up")
        _ip("-n", node.name, "addr", "add", f"{node.ip}/24", "dev", "lan0")
        _ip("-n", node.name, "link", "set", "lan0", "up")
        node.sysctl("net.ipv4.ip_forward", 1)
        return node

    def close(self) -> None:
        """Kill every process in the cluster's namespaces and delete them and the root link.
        Safe to call twice, and after a failed ``start``."""
        for ns in reversed(self._created):
            ns.kill_all()
        if self._root_link:
            _ip("link", "delete", self.root_interface, missing_ok=True)
            self._root_link = False
        for ns in reversed(self._created):
            _ip("netns", "delete", ns.name, missing_ok=True)
        self._created.clear()

    async def aclose(self) -> None:
        """``close``, after stopping spawned processes gracefully (SIGTERM first)."""
        await asyncio.gather(*(ns.stop_processes() for ns in self._created))
        self.close()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Cluster:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _track(self, ns: Netns) -> None:
        self._created.append(ns)


def sweep(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Delete namespaces and root links left by runs (named ``<prefix>-<pid>-...``) whose
    process is gone. Live runs, including parallel ones, are left alone. Returns what went."""
    owner = re.compile(rf"{re.escape(prefix)}-(\d+)-\d+(?:-|$)")
    removed = []
    for name in list_namespaces():
        match = owner.match(name)
        if match and not _alive(int(match.group(1))):
            _kill_pids_in(name)
            _ip("netns", "delete", name, missing_ok=True)
            removed.append(name)
    for link in json.loads(_ip("-j", "link", "show").stdout or "[]"):
        match = owner.fullmatch(link.get("ifalias", ""))
        if match and not _alive(int(match.group(1))):
            _ip("link", "delete", link["ifname"], missing_ok=True)
            removed.append(link["ifname"])
    return removed


def list_namespaces() -> list[str]:
    """Names from ``ip netns list`` (which may append ``(id: N)``)."""
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


def root_links() -> list[str]:
    """Interface names in the root namespace."""
    return [link["ifname"] for link in json.loads(_ip("-j", "link", "show").stdout or "[]")]


# ---------------------------------------------------------------- helpers


def _ip(*argv: str, missing_ok: bool = False) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["ip", *argv], capture_output=True, text=True, timeout=_IP_TIMEOUT, check=False
    )
    if result.returncode != 0 and not (missing_ok and _is_missing(result.stderr)):
        _check(result)
    return result


def _is_missing(stderr: str) -> bool:
    text = stderr.lower()
    return "cannot find device" in text or "no such file" in text or "does not exist" in text


def _check(result: subprocess.CompletedProcess[str]) -> None:
    if result.returncode != 0:
        command = " ".join(str(a) for a in result.args)
        raise RuntimeError(
            f"{command!r} exited {result.returncode}: {result.stderr.strip() or result.stdout}"
        )


def _environment(extra: Mapping[str, str] | None) -> dict[str, str] | None:
    return None if extra is None else {**os.environ, **extra}


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _kill_pids_in(namespace: str) -> None:
    result = _ip("netns", "pids", namespace, missing_ok=True)
    for pid in result.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _require_name(what: str, name: str) -> None:
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?", name):
        raise ValueError(f"{what} name must be lowercase letters, digits and '-', not {name!r}")


@contextlib.contextmanager
def _lan_lock() -> Any:
    """Serialise choosing a LAN and claiming it (its address on the root link) across runs."""
    with open(_LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _free_lan(wanted: int | None) -> int:
    """A LAN octet whose 10.200.<n>.0/24 nothing in the root namespace uses yet."""
    used = set()
    for line in _ip("-4", "route", "show", "table", "all").stdout.splitlines():
        with contextlib.suppress(ValueError, IndexError):
            net = ipaddress.IPv4Network(line.split()[0], strict=False)
            if net.prefixlen >= 16 and net.subnet_of(ipaddress.IPv4Network(f"{LAN_PREFIX}.0.0/16")):
                used.add(int(net.network_address.packed[2]))
    if wanted is not None:
        if not 0 <= wanted <= 255 or wanted in used:
            raise ValueError(f"LAN {LAN_PREFIX}.{wanted}.0/24 is not free or not valid")
        return wanted
    start = os.getpid() % 250
    for n in itertools.chain(range(start, 256), range(start)):
        if n not in used:
            return n
    raise RuntimeError(f"no free /24 left in {LAN_PREFIX}.0.0/16")
