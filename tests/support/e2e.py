"""podiam on a one-machine cluster: the real server and agents as processes in node namespaces,
pods as network namespaces behind them, and the Kubernetes API and STS in this process.

Unit and loopback tests show that each part keeps its contract; only this shows what a user of
EKS sees: an unmodified AWS SDK in a pod asks 169.254.169.254, the node's DNAT rule sends it to
the agent, the agent tells pods apart by their source address, and the server, bound to the
node the agent runs on, assumes the pod's role. It is shared by the end-to-end tests and the
README demo, so it starts everything the way an operator would (flags, certificates, signals)
and never reaches into the processes. It would be unnecessary with a throwaway real cluster
(kind with a fake metadata service) in CI.

    root namespace (this process)   KubeApiServer and MotoSts on Cluster.root_ip
        │ LAN 10.200.L.0/24
    node "server" (10.200.L.1)      podiam-server on :8443 (mutual TLS)
    node "worker-k" (10.200.L.k+1)  podiam-agent on :8181 with --iptables, metrics on :9620
        │ eni… veths
    pods 10.201.k.p                 AWS clients, run with ``PodiamPod.run``

Pods reach STS (moto, at the root address) through their node, which masquerades pod traffic
leaving on the LAN; nothing is routed to pods from the root namespace. The masquerade applies
only to forwarded traffic: a pod's metadata request is DNATed to the node itself (local
delivery), so the agent still sees the pod's own address.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from certs.authority import DEFAULT_SERVER_NAMES, generate_bundle, write_bundle
from certs.tls import TlsFiles
from tests.support.kubeapi import KubeApiServer
from tests.support.moto_sts import FAKE_ACCESS_KEY_ID, FAKE_SECRET_ACCESS_KEY, REGION, MotoSts
from tests.support.netns import Cluster, Fetched, Node, Pod
from tests.support.objects import PERMITTED, ROLE
from tests.support.waiting import eventually

REPO = Path(__file__).resolve().parents[2]
BASE_ARN = "arn:aws:iam::123456789012:role/"
METADATA_URL = "http://169.254.169.254"
SERVER_PORT = 8443
AGENT_PORT = 8181
AGENT_METRICS_PORT = 9620
LAN_INTERFACE = "lan0"  # each node's LAN interface in the netns kit
# Every worker joins as a new EKS node would with podiam's startup taint on its node group, and
# another taint podiam must leave alone.
STARTUP_TAINT = {"key": "podiam.io/agent-not-ready", "value": "true", "effect": "NoExecute"}
NODE_GROUP_TAINT = {"key": "dedicated", "value": "workers", "effect": "NoSchedule"}
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


# Inside a pod: the default credential chain, then STS GetCallerIdentity with what it found.
# Prints one JSON line: the provider that answered, the access key, and who STS says it is (or
# the exception's class name).
WHO_AM_I = r"""
import json, sys
import boto3
session = boto3.Session()
credentials = session.get_credentials()
out = {"method": None, "access_key": None, "arn": None, "error": None}
if credentials is not None:
    out["method"], out["access_key"] = credentials.method, credentials.access_key
try:
    out["arn"] = session.client("sts", endpoint_url=sys.argv[1]).get_caller_identity()["Arn"]
except Exception as error:
    out["error"] = type(error).__name__
print(json.dumps(out))
"""


class StartError(RuntimeError):
    """A podiam process did not come up; the message carries its log."""

    def __init__(self, message: str, process: PodiamProcess | None = None) -> None:
        super().__init__(message)
        self.process = process


# Runs in a pod: asks ``path`` over and over for ``seconds`` (one keep-alive connection,
# reopened after any error, as SDKs do) and prints how each request ended, as one JSON line.
_HAMMER = r"""
import http.client, json, sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
counts, slowest, conn = {}, 0.0, None
end = time.monotonic() + seconds
while True:  # at least one request, even for seconds=0
    started = time.monotonic()
    try:
        if conn is None:
            conn = http.client.HTTPConnection("169.254.169.254", 80, timeout=2)
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        outcome = str(response.status)
    except Exception as error:
        outcome, conn = type(error).__name__, None
    slowest = max(slowest, time.monotonic() - started)
    counts[outcome] = counts.get(outcome, 0) + 1
    if time.monotonic() >= end:
        break
    time.sleep(0.002)
print(json.dumps({"counts": counts, "slowest": slowest}))
"""


class PodiamProcess:
    """podiam-server or podiam-agent running in a node's namespace, its output in a log file.

    ``start``/``stop``/``kill`` may be called repeatedly (a restart is ``stop`` then
    ``start``); the log accumulates across runs.
    """

    def __init__(
        self, node: Node, what: str, argv: Sequence[str], env: Mapping[str, str], log: Path
    ) -> None:
        self.node = node
        self.what = what
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = log
        self.process: asyncio.subprocess.Process | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.what!r} in {self.node.name})"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def logged(self, text: str) -> bool:
        """Whether ``text`` appears in the log within 10 s. Podiam writes INFO lines
        at the end of the event loop's turn (runtime/logs.py), so a client can hold the answer
        a line describes before the line is in the file."""
        try:
            await eventually(lambda: text in self.log(), timeout=10, interval=0.02)
        except AssertionError:
            return False
        return True

    async def start(self) -> None:
        """Start the process and return once it is ready (see ``ready``)."""
        if self.running:
            raise RuntimeError(f"{self} is already running")
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            self.process = await self.node.spawn(
                sys.executable, "-m", self.what, *self.argv,
                env=self.env, stdout=log, stderr=log,
            )  # fmt: skip
        finally:
            os.close(log)  # the child has its own copy
        try:
            await asyncio.wait_for(self._until_ready(offset), START_TIMEOUT)
        except TimeoutError:
            raise StartError(self._failure(f"not ready after {START_TIMEOUT:g}s"), self) from None

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> int | None:
        """Send ``sig`` and wait for the exit (SIGKILL after ``STOP_TIMEOUT``); the exit code."""
        if self.process is None:
            return None
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            try:
                await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                await self.process.wait()
        return self.process.returncode

    async def kill(self) -> int | None:
        """SIGKILL: the process gets no chance to clean up (as after an OOM kill)."""
        return await self.stop(signal.SIGKILL)

    async def _until_ready(self, offset: int) -> None:
        while not await self.ready(offset):
            if not self.running:
                raise StartError(self._failure(f"exited with code {self.returncode}"), self)
            await asyncio.sleep(0.1)

    async def ready(self, offset: int = 0) -> bool:
        raise NotImplementedError

    def _failure(self, what: str) -> str:
        return f"{self.what} in {self.node.name} {what}; its log:\n{self.log()}"


class ServerProcess(PodiamProcess):
    async def ready(self, offset: int = 0) -> bool:
        """Ready once it logs that it serves gRPC (after its first full list)."""
        return "serving gRPC" in self.log()[offset:]


class AgentProcess(PodiamProcess):
    @property
    def url(self) -> str:
        return f"http://{self.node.ip}:{AGENT_PORT}"

    @property
    def ready_file(self) -> Path:
        """The agent's ``--ready-file``: what the chart's readiness probe looks at, because
        during an upgrade the shared port may be answered by the other agent."""
        return self.log_path.with_suffix(".ready")

    async def start(self) -> None:
        self.ready_file.unlink(missing_ok=True)
        await super().start()

    async def ready(self, offset: int = 0) -> bool:
        """Ready once this process says so in its ready file (listening, stream live)."""
        return self.running and self.ready_file.exists()

    def cleanup(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``podiam-agent cleanup`` on this agent's node, as an operator would run it."""
        return self.node.run(
            sys.executable, "-m", "agent", "cleanup", "--port", str(AGENT_PORT), *args,
            env=self.env, timeout=30, check=False,
        )  # fmt: skip

    def dnat_rules(self) -> list[str]:
        """The node's ``nat PREROUTING`` rules that send metadata traffic somewhere."""
        return dnat_rules(self.node)


def dnat_rules(node: Node) -> list[str]:
    out = node.run("iptables", "-w", "5", "-t", "nat", "-S", "PREROUTING").stdout
    return [
        line for line in out.splitlines() if line.startswith("-A ") and "169.254.169.254" in line
    ]


@dataclass
class PodiamPod:
    """A pod: its network namespace behind a worker node and its object in the Kubernetes API."""

    netns: Pod
    namespace: str
    name: str
    role: str | None
    cluster: PodiamCluster = field(repr=False)

    @property
    def ip(self) -> str:
        return self.netns.ip

    @property
    def node(self) -> Node:
        return self.netns.node

    async def run(
        self,
        *argv: str,
        env: Mapping[str, str] | None = None,
        timeout: float = 30.0,  # noqa: ASYNC109 - the child is killed when it expires
    ):
        """Run ``argv`` in the pod with exactly ``cluster.pod_env()`` plus ``env`` as its
        environment (nothing inherited from this process); the result is not checked."""
        variables = {**self.cluster.pod_env(), **(env or {})}
        return await self.netns.arun(
            "env", "-i", *(f"{k}={v}" for k, v in variables.items()), *argv,
            check=False, timeout=timeout,
        )  # fmt: skip

    async def hammer(self, path: str, seconds: float) -> tuple[dict[str, int], float]:
        """Ask ``path`` in a loop for ``seconds``: how many requests ended how (HTTP status or
        error name), and the slowest request's seconds."""
        result = await self.run(
            sys.executable, "-c", _HAMMER, path, str(seconds), timeout=seconds + 30
        )
        if result.returncode != 0:
            raise RuntimeError(f"load in {self.name} failed: {result.stderr}")
        found = json.loads(result.stdout)
        return found["counts"], found["slowest"]

    async def fetch(
        self,
        path: str,
        *,
        method: str = "GET",
        headers: Mapping[str, str] | None = None,
        timeout: float = 2.0,  # noqa: ASYNC109 - handed to the client inside the namespace
    ) -> Fetched:
        """One HTTP request to the metadata address (``path`` like ``/latest/...``)."""
        return await self.netns.fetch(
            METADATA_URL + path, method=method, headers=headers, timeout=timeout
        )


class PodiamCluster:
    """podiam on a ``Cluster``: one server node, ``workers`` agent nodes, and their pods.

    ``permitted`` maps Kubernetes namespaces to their ``iam.amazonaws.com/permitted``
    expression (None: the namespace exists without the annotation). ``agent_args`` and
    ``server_args`` are appended to every agent's and the server's flags; ``worker_args`` maps a
    worker's 0-based index to flags for its agent alone (one cluster, agents set up differently).

    Use ``async with PodiamCluster(...) as podiam:``. Everything is stopped and removed on exit,
    even after a failed start: agents get SIGTERM first (their DNAT rules stay, as on a real
    node), then the server, then the in-process API servers, then the namespaces.
    """

    def __init__(
        self,
        *,
        workers: int = 2,
        permitted: Mapping[str, str | None] | None = None,
        agent_args: Sequence[str] = (),
        server_args: Sequence[str] = (),
        worker_args: Mapping[int, Sequence[str]] | None = None,
        servers: int = 1,
    ) -> None:
        if workers < 1:
            raise ValueError("a cluster needs at least one worker")
        if servers < 1:
            raise ValueError("a cluster needs at least one server")
        self.server_count = servers
        self.worker_count = workers
        self.permitted = dict(permitted or {})
        self.agent_args = list(agent_args)
        self.worker_args = {k: list(v) for k, v in (worker_args or {}).items()}
        self.server_args = list(server_args)
        self.cluster = Cluster()
        self.kube: KubeApiServer | None = None
        self.sts: MotoSts | None = None
        self.server: ServerProcess | None = None  # the first replica
        self.servers: list[ServerProcess] = []  # every replica, on ports SERVER_PORT + k
        self.server_node: Node | None = None
        self.workers: list[Node] = []
        self.agents: dict[str, AgentProcess] = {}  # by node name
        self.extra_agents: list[AgentProcess] = []  # started beside another (upgrades)
        self.pods: list[PodiamPod] = []
        self.work = Path()
        self.tls: Path = Path()
        self._stack = contextlib.AsyncExitStack()

    # ---------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> PodiamCluster:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        try:
            await self._start()
        except StartError as error:
            others = [p for p in self.processes if p is not error.process]
            logs = "".join(f"\n--- {p.what} in {p.node.name}:\n{p.log()}" for p in others)
            await self.stop()
            raise StartError(f"{error}{logs}", error.process) from None
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop and remove everything; safe to call twice."""
        await self._stack.aclose()

    async def _start(self) -> None:
        stack = self._stack
        self.cluster.start()  # skips the test (fails it under CI=true) if not possible here
        stack.push_async_callback(self.cluster.aclose)
        self.work = Path(tempfile.mkdtemp(prefix="podiam-e2e-"))
        stack.callback(shutil.rmtree, self.work, ignore_errors=True)
        (self.work / "home").mkdir()

        root_ip = self.cluster.root_ip
        self.kube = KubeApiServer(host=root_ip)
        await self.kube.start()
        stack.push_async_callback(self.kube.stop)
        for namespace, expression in self.permitted.items():
            annotations = {PERMITTED: expression} if expression is not None else None
            self.kube.add_namespace(namespace, annotations=annotations)
        if "default" not in self.permitted:
            self.kube.add_namespace("default")  # where Events about nodes go
        self.sts = MotoSts(host=root_ip)
        await asyncio.to_thread(self.sts.start)
        stack.push_async_callback(asyncio.to_thread, self.sts.stop)

        self.server_node = self.cluster.node("server")
        self.workers = [self.cluster.node(f"worker-{k}") for k in range(1, self.worker_count + 1)]
        for node in self.workers:
            self.kube.add_node(
                node.node_name, internal_ip=node.ip, taints=[STARTUP_TAINT, NODE_GROUP_TAINT]
            )
            # Pods' traffic to the LAN (to STS) leaves as the node's, so replies find their way
            # back without routes to pods anywhere else.
            node.run(
                "iptables", "-w", "5", "-t", "nat", "-A", "POSTROUTING",
                "-s", str(node.pod_network), "-o", LAN_INTERFACE, "-j", "MASQUERADE",
            )  # fmt: skip

        self.tls = self.work / "tls"
        bundle = generate_bundle(server_names=[*DEFAULT_SERVER_NAMES, self.server_node.ip])
        write_bundle(bundle, self.tls)

        for replica in range(self.server_count):
            await self._start_server(replica)
        # The agents go down before the server (pushed later, so unwound earlier).
        stack.push_async_callback(self.stop_agents)
        await asyncio.gather(*(self._start_agent(node) for node in self.workers))

    async def _start_server(self, replica: int = 0) -> None:
        assert self.kube is not None and self.sts is not None and self.server_node is not None
        kubeconfig = self.work / "kubeconfig"
        self.kube.write_kubeconfig(str(kubeconfig))
        files = TlsFiles.server_in(self.tls)
        argv = [
            "--bind", f"0.0.0.0:{SERVER_PORT + replica}",
            "--cert", str(files.cert), "--key", str(files.key), "--ca", str(files.ca),
            "--kubeconfig", str(kubeconfig),
            "--role-base-arn", BASE_ARN,
            "--region", REGION,
            "--sts-endpoint", self.sts.endpoint_url,
            "--prometheus-listen-addr", "",
            *self.server_args,
        ]  # fmt: skip
        env = {
            **self._process_env(),
            "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_ACCESS_KEY,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        log = self.work / ("server.log" if replica == 0 else f"server-{replica}.log")
        server = ServerProcess(self.server_node, "server", argv, env, log)
        self.servers.append(server)
        self.server = self.servers[0]
        self._stack.push_async_callback(server.stop)
        await server.start()

    async def _start_agent(self, node: Node) -> None:
        agent = self._agent_process(node, "agent")
        self.agents[node.node_name] = agent
        await agent.start()

    def _agent_process(self, node: Node, name: str) -> AgentProcess:
        assert self.sts is not None and self.server_node is not None
        files = TlsFiles.agent_in(self.tls)
        log = self.work / f"{name}-{node.node_name}.log"
        argv = [
            "--host", node.ip,
            "--node-name", node.node_name,
            "--port", str(AGENT_PORT),
            "--iptables",
            "--host-interface", "eni+",
            "--server-address", self.server_addresses,
            "--cert", str(files.cert), "--key", str(files.key), "--ca", str(files.ca),
            "--metadata-endpoint", self.sts.endpoint_url,
            "--prometheus-listen-addr", f"{node.ip}:{AGENT_METRICS_PORT}",
            "--ready-file", str(log.with_suffix(".ready")),
            *self.agent_args,
            *self.worker_args.get(self.workers.index(node), ()),
        ]  # fmt: skip
        return AgentProcess(node, "agent", argv, self._process_env(), log)

    async def start_agent_beside(self, node: Node | str | int, name: str) -> AgentProcess:
        """A second agent on ``node``'s port, beside the one running there (as the chart's
        surge upgrade starts one); stopped with the others. Returns once it is ready."""
        node = node if isinstance(node, Node) else self.worker(node)
        agent = self._agent_process(node, name)
        self.extra_agents.append(agent)
        await agent.start()
        return agent

    async def stop_agents(self) -> None:
        """SIGTERM every agent and wait (their DNAT rules stay, as in production)."""
        agents = [*self.agents.values(), *self.extra_agents]
        await asyncio.gather(*(agent.stop() for agent in agents))

    @staticmethod
    def _process_env() -> dict[str, str]:
        return {"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}

    # ---------------------------------------------------------------- what tests use

    def worker(self, name_or_index: str | int) -> Node:
        """A worker node by name (``worker-1``) or 0-based index."""
        if isinstance(name_or_index, int):
            return self.workers[name_or_index]
        return next(node for node in self.workers if node.node_name == name_or_index)

    def agent(self, node: Node | str | int) -> AgentProcess:
        node = node if isinstance(node, Node) else self.worker(node)
        return self.agents[node.node_name]

    def add_pod(
        self,
        node: Node | str | int,
        namespace: str,
        name: str,
        role: str | None = None,
        *,
        reuse: PodiamPod | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> PodiamPod:
        """Create pod ``namespace/name`` on ``node`` with ``role`` (None: no role annotation):
        a new network namespace (its IP is the next free one on the node), or ``reuse``'s —
        the same IP, as when the CNI hands a deleted pod's address to a new pod — and the pod
        in the Kubernetes API (``status.podIP``, ``status.hostIP``, annotations)."""
        assert self.kube is not None
        if reuse is not None:
            netns = reuse.netns
        else:
            node = node if isinstance(node, Node) else self.worker(node)
            netns = node.add_pod(name)
        pod_annotations = {**({ROLE: role} if role else {}), **(annotations or {})}
        self.kube.add_pod(
            namespace, name, ip=netns.ip, host_ip=netns.node.ip,
            annotations=pod_annotations, node_name=netns.node.node_name,
        )  # fmt: skip
        pod = PodiamPod(netns, namespace, name, role, self)
        self.pods.append(pod)
        return pod

    def delete_pod(self, pod: PodiamPod) -> None:
        """Delete the pod from the Kubernetes API. Its network namespace stays (removed with
        the cluster) so that ``add_pod(..., reuse=pod)`` can give its IP to a new pod."""
        assert self.kube is not None
        self.kube.delete_pod(pod.namespace, pod.name)

    def pod_env(self) -> dict[str, str]:
        """The whole environment of AWS clients in pods: no credentials, no config files, the
        region, nothing disabling the metadata service; HOME is an empty directory."""
        return {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": str(self.work / "home"),
            "LANG": "C.UTF-8",
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
            "AWS_DEFAULT_REGION": REGION,
        }

    @property
    def sts_url(self) -> str:
        assert self.sts is not None
        return self.sts.endpoint_url

    @property
    def server_address(self) -> str:
        """The first replica's address."""
        assert self.server_node is not None
        return f"{self.server_node.ip}:{SERVER_PORT}"

    @property
    def server_addresses(self) -> str:
        """Every replica, as the agents' ``--server-address`` lists them."""
        assert self.server_node is not None
        ip = self.server_node.ip
        return ",".join(f"{ip}:{SERVER_PORT + k}" for k in range(self.server_count))

    def agent_tls(self) -> TlsFiles:
        return TlsFiles.agent_in(self.tls)

    @property
    def processes(self) -> list[PodiamProcess]:
        """The server and the agents (started or not)."""
        return [p for p in (*self.servers, *self.agents.values(), *self.extra_agents) if p]

    def logs(self) -> str:
        """Every podiam process's log, for a failure message."""
        return "".join(f"\n--- {p.what} in {p.node.name}:\n{p.log()}" for p in self.processes)


# Runs in a node: the node's real metadata service, as far as pods without podiam can tell. It
# keeps connections alive (as IMDS does) and logs every request it gets, one line each, so a
# test can prove which requests reached the node's role and which never did.
_NODE_METADATA = r"""
import http.server, sys
log = open(sys.argv[1], "a", buffering=1)
class NodeMetadata(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        log.write(f"{self.client_address[0]} {self.path}\n")
        body = f"node-metadata {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("169.254.169.254", 80), NodeMetadata)
print("listening", flush=True)
server.serve_forever()
"""


class NodeMetadataService:
    """A stand-in for the node's own metadata service at 169.254.169.254:80, inside ``node``
    (the address on its loopback), with a log of the requests it answered."""

    ADDRESS = "169.254.169.254"

    def __init__(self, node: Node, log: Path) -> None:
        self.node = node
        self.log_path = log
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.node.run("ip", "addr", "add", f"{self.ADDRESS}/32", "dev", "lo")
        self._process = await self.node.spawn(
            sys.executable, "-c", _NODE_METADATA, str(self.log_path),
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert self._process.stdout is not None
        line = await asyncio.wait_for(self._process.stdout.readline(), 10)
        if line.strip() != b"listening":
            raise RuntimeError(f"the node metadata stand-in did not start in {self.node.name}")

    def requests(self) -> list[str]:
        """``"<client ip> <path>"`` for every request it answered."""
        try:
            return self.log_path.read_text().splitlines()
        except FileNotFoundError:
            return []

    async def stop(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
            await self._process.wait()
        self.node.run("ip", "addr", "del", f"{self.ADDRESS}/32", "dev", "lo", check=False)
