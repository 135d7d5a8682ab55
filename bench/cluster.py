"""The loopback cluster most sections share: the Kubernetes API test server, STS (moto) and
podiam-server in this process, and podiam-agent as its own process pinned to its own core.

On loopback every 127.x.y.z address is this machine's, so a pod is a source address: pod k of
the benchmark is 127.<1+k//250>.<k%250+1>... (see ``pod_ip``), listed in the API with that IP
and ``status.hostIP`` 127.0.0.1, the address the agent connects to the server from, so node
binding is on exactly as in a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from bench import procs
from tests.support.kubeapi import KubeApiServer
from tests.support.moto_sts import MotoSts
from tests.support.objects import PERMITTED, ROLE
from tests.support.pods import NODE
from tests.support.server import running_server
from tests.support.tls import make_tls_dirs

NAMESPACE = "bench"
SESSION_NAME = "iam.amazonaws.com/session-name"
CREDENTIALS = "/latest/meta-data/iam/security-credentials/"


def pod_ip(index: int, *, block: int = 1) -> str:
    """A distinct loopback address per pod; ``block`` separates the sets sections use."""
    return f"127.{block + index // 62500}.{(index // 250) % 250 + 1}.{index % 250 + 1}"


async def spawn_agent(
    log: Path, *, port: int, server_port: int, tls, args: Sequence[str] = ()
) -> asyncio.subprocess.Process:
    """podiam-agent as its own process on the served core, serving loopback pods on
    ``NODE:port`` from the server on ``127.0.0.1:server_port``, with no real metadata service
    behind it (a closed port) and no metrics listener; ``args`` after those flags; its output
    appended to ``log``."""
    files = tls.agent
    out = open(log, "ab")  # noqa: ASYNC230 - once, at start-up
    try:
        return await procs.spawn(
            [
                "-m", "agent",
                "--host", NODE, "--port", str(port),
                "--server-address", f"127.0.0.1:{server_port}",
                "--cert", str(files.cert), "--key", str(files.key), "--ca", str(files.ca),
                "--metadata-endpoint", "http://127.0.0.1:9",
                "--prometheus-listen-addr", "",
                *args,
            ],
            core=procs.cpu(procs.SERVED_CPU),
            stdout=out.fileno(),
            stderr=out.fileno(),
        )  # fmt: skip
    finally:
        out.close()


class LoopbackCluster:
    def __init__(self, work: Path | None = None) -> None:
        self.work = work or Path(tempfile.mkdtemp(prefix="podiam-bench-"))
        self.kube = KubeApiServer()
        self.sts = MotoSts()
        self._stack = contextlib.AsyncExitStack()
        self.agent: asyncio.subprocess.Process | None = None
        self.agent_port = 0
        self.server = None

    async def __aenter__(self) -> LoopbackCluster:
        stack = self._stack
        await stack.__aenter__()
        try:
            await self.kube.start()
            stack.push_async_callback(self.kube.stop)
            self.kube.add_namespace(NAMESPACE, annotations={PERMITTED: ".*"})
            await asyncio.to_thread(self.sts.start)
            stack.push_async_callback(asyncio.to_thread, self.sts.stop)
            self.tls = make_tls_dirs(self.work / "tls")
            self.server = await stack.enter_async_context(
                running_server(self.kube, self.sts, self.tls, self.work)
            )
            await self._start_agent()
        except BaseException:
            await stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def _start_agent(self) -> None:
        self.agent_port = procs.free_port()
        self.agent_log = self.work / "agent.log"
        self.agent = await spawn_agent(
            self.agent_log, port=self.agent_port, server_port=self.server.server.port,
            tls=self.tls, args=["--log-level", "warning"],
        )  # fmt: skip
        self._stack.push_async_callback(procs.stop, self.agent)
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.agent.returncode is not None:
                    break
                with contextlib.suppress(aiohttp.ClientError):
                    url = f"http://{NODE}:{self.agent_port}/health?deep=1"
                    async with session.get(url) as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise RuntimeError(
            f"the agent did not become ready; its log:\n{self.agent_log.read_text()}"
        )

    @property
    def agent_pid(self) -> int:
        assert self.agent is not None
        return self.agent.pid

    def add_pods(
        self, count: int, *, block: int, roles: int, prefix: str, shared_session: bool = True
    ) -> list[tuple[str, str, str]]:
        """Add ``count`` pods spread over ``roles`` roles; (ip, pod name, role name) each.
        With ``shared_session`` the pods of a role share its session-name annotation, and so
        one role identity (one set of credentials, one AssumeRole per refresh)."""
        pods, specs = pod_specs(
            count, block=block, roles=roles, prefix=prefix, shared_session=shared_session
        )
        self.kube.add_pods(specs)
        return pods

    async def get(self, ip: str, path: str, headers: dict[str, str] | None = None):
        """One request from ``ip`` to the agent: (status, body bytes)."""
        return await http_get(ip, NODE, self.agent_port, path, headers)


def pod_specs(
    count: int, *, block: int, roles: int, prefix: str, shared_session: bool = True
) -> tuple[list[tuple[str, str, str]], list[dict]]:
    """The pods ``LoopbackCluster.add_pods`` adds, and their ``KubeApiServer.add_pods`` specs."""
    pods, specs = [], []
    for k in range(count):
        role = f"{prefix}-role-{k % roles}"
        name = f"{prefix}-{k}"
        annotations = {ROLE: role}
        if shared_session:
            annotations[SESSION_NAME] = f"{prefix}-app-{k % roles}"
        ip = pod_ip(k, block=block)
        specs.append(
            {
                "namespace": NAMESPACE,
                "name": name,
                "ip": ip,
                "host_ip": NODE,
                "annotations": annotations,
                "node_name": "bench-node",
            }
        )
        pods.append((ip, name, role))
    return pods, specs


async def http_get(
    source: str, host: str, port: int, path: str, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    try:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        head = f"GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{extra}Connection: close\r\n"
        writer.write(head.encode() + b"\r\n")
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def wait_served(cluster: LoopbackCluster, pods, *, seconds: float = 30) -> None:
    """Until the agent answers every pod's credentials request with 200."""
    deadline = time.monotonic() + seconds
    pending = list(pods)
    while pending and time.monotonic() < deadline:
        answers = await asyncio.gather(
            *(cluster.get(ip, CREDENTIALS + role) for ip, _name, role in pending[:200])
        )
        done = {p for p, (status, _) in zip(pending[:200], answers, strict=True) if status == 200}
        pending = [p for p in pending if p not in done]
        if pending:
            await asyncio.sleep(0.1)
    if pending:
        raise RuntimeError(f"{len(pending)} pods not served after {seconds:g}s")


def quiet_logs() -> None:
    logging.basicConfig(level=logging.WARNING)
    for name in ("werkzeug", "server", "agent", "aiohttp", "grpc", "botocore", "podiam"):
        logging.getLogger(name).setLevel(logging.WARNING)
