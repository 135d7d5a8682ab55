"""A local podiam stack to poke at (`make up`, `python -m demo.up`): it stays up until Ctrl-C or
SIGTERM.

The demo (``python -m demo``) shows one pod served and one refused, then stops; this keeps the same
pieces running so that a newcomer can curl the agent, read both programs' metrics and load-test
the agent with locust. moto plays STS and the EC2 metadata service and the Kubernetes API test
server holds the namespace and the pods, both in this process; podiam-server and podiam-agent
run as the real programs (their own processes, their own metrics registries, their logs on this
terminal), started with the flags an operator would use.

As root with ``ip`` and ``iptables`` it is the demo's network-namespace variant: a server node, a
worker node whose agent installs the real DNAT rule, and two pods behind it; a client is a pod
when it runs inside the pod's namespace (``ip netns exec``) and asks 169.254.169.254. Otherwise
(or with ``PODIAM_DEMO=loopback``, as for the demo) it is the loopback variant: pods are the
addresses 127.0.1.x of this machine, so a client "is" a pod when it sends from that address
(``curl --interface``, the locustfile's ``PODIAM_LOCUST_SOURCES``), and there is no DNAT rule.

What to use is printed on stdout, in lines a script can read (``<label>: <value>``); the
programs' logs go to stderr (in the namespace variant, to the log files it names). On the way
down the agent stops first, then the server, then the test servers; the temporary directory
(certificates, kubeconfig) and any namespaces are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shlex
import signal
import socket
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import aiohttp

from demo.variant import why_not_namespaces
from runtime import logs
from tests.support.kubeapi import KubeApiServer
from tests.support.moto_sts import FAKE_ACCESS_KEY_ID, FAKE_SECRET_ACCESS_KEY, REGION, MotoSts
from tests.support.server import BASE_ARN
from tests.support.tls import make_tls_dirs

NODE = "127.0.0.1"
NAMESPACE, PERMITTED, ROLE = "shop", "app-.*", "app-web"
PODS = 20  # web-1 … web-20 on 127.0.1.1 … 127.0.1.20, all with ROLE
INTRUDER = ("intruder", "127.0.1.100", "admin")  # a pod whose role its namespace does not permit
CREDS = "/latest/meta-data/iam/security-credentials/"
# The chart's ports, when free here; otherwise whatever the kernel picks.
PREFERRED_PORTS = {"agent": 8181, "agent metrics": 9620, "server": 8443, "server metrics": 9621}
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
REPO = Path(__file__).resolve().parents[1]


def say(text: str = "") -> None:
    print(text, flush=True)


def free_port(preferred: int) -> int:
    """``preferred`` if nothing listens on it on loopback, else a free port."""
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind((NODE, port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError("no free port on loopback")


def _die_with_parent() -> None:
    # Runs in the child before exec: if `make up` is killed outright, the child gets SIGTERM
    # from the kernel instead of running on unowned (PR_SET_PDEATHSIG, Linux).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


class Program:
    """podiam-server or podiam-agent as a child process whose logs go to our stderr."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> None:
        self.name = name
        self.argv = [str(Path(sys.executable).with_name(name)), *argv]
        self.env = {**os.environ, **env}
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        # Its own session: Ctrl-C reaches only us, and we stop the programs in order.
        self.process = await asyncio.create_subprocess_exec(
            *self.argv, env=self.env, stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_die_with_parent,
        )  # fmt: skip

    @property
    def exited(self) -> int | None:
        return None if self.process is None else self.process.returncode

    async def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        return self.process.returncode


async def until_ready(server: Program, metrics_url: str, agent: Program, agent_url: str) -> None:
    """Start the agent once the server serves (its metrics come up with gRPC), so that the
    agent connects at once; return when the agent's readiness check passes."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
        await _until_ok(http, metrics_url, [server])
        await agent.start()
        # deep: connected to the server, with a live node stream.
        await _until_ok(http, f"{agent_url}/health?deep=1", [server, agent])


async def _until_ok(http: aiohttp.ClientSession, url: str, programs: Sequence[Program]) -> None:
    while True:
        for program in programs:
            if program.exited is not None:
                raise RuntimeError(f"{program.name} exited with code {program.exited}")
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with http.get(url) as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.2)


def command_path(name: str) -> str:
    """The program beside this interpreter, relative to the current directory when inside it."""
    path = Path(sys.executable).with_name(name)
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


async def loopback_up(work: Path, stopping: asyncio.Event) -> int:
    ports = {what: free_port(port) for what, port in PREFERRED_PORTS.items()}
    sts = MotoSts()
    await asyncio.to_thread(sts.start)
    try:
        async with KubeApiServer() as kube:
            kube.add_namespace(NAMESPACE, annotations={"iam.amazonaws.com/permitted": PERMITTED})
            pods = [(f"web-{n}", f"127.0.1.{n}", ROLE) for n in range(1, PODS + 1)]
            for name, ip, role in (*pods, INTRUDER):
                kube.add_pod(
                    NAMESPACE, name, ip=ip, host_ip=NODE,
                    annotations={"iam.amazonaws.com/role": role},
                )  # fmt: skip
            kubeconfig = work / "kubeconfig"
            kube.write_kubeconfig(str(kubeconfig))
            tls = make_tls_dirs(work / "tls")
            server = Program(
                "podiam-server",
                [
                    "--bind", f"{NODE}:{ports['server']}",
                    "--cert", str(tls.server.cert), "--key", str(tls.server.key),
                    "--ca", str(tls.server.ca),
                    "--kubeconfig", str(kubeconfig),
                    "--role-base-arn", BASE_ARN, "--region", REGION,
                    "--sts-endpoint", sts.endpoint_url,
                    "--prometheus-listen-addr", f"{NODE}:{ports['server metrics']}",
                ],
                {
                    # moto's fake keys, never whatever this machine has.
                    "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY_ID,
                    "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_ACCESS_KEY,
                    "AWS_EC2_METADATA_DISABLED": "true",
                },
            )  # fmt: skip
            agent = Program(
                "podiam-agent",
                [
                    "--host", NODE, "--port", str(ports["agent"]),
                    "--server-address", f"{NODE}:{ports['server']}",
                    "--cert", str(tls.agent.cert), "--key", str(tls.agent.key),
                    "--ca", str(tls.agent.ca),
                    "--metadata-endpoint", sts.endpoint_url,
                    "--prometheus-listen-addr", f"{NODE}:{ports['agent metrics']}",
                ],
                {},
            )  # fmt: skip
            try:
                await server.start()
                agent_url = f"http://{NODE}:{ports['agent']}"
                metrics_url = f"http://{NODE}:{ports['server metrics']}/metrics"
                ready = asyncio.ensure_future(until_ready(server, metrics_url, agent, agent_url))
                halted = asyncio.ensure_future(stopping.wait())
                done, _ = await asyncio.wait(
                    {ready, halted}, timeout=READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
                )
                halted.cancel()
                if ready not in done:
                    ready.cancel()
                    if not stopping.is_set():
                        say(f"podiam did not become ready within {READY_TIMEOUT:g}s")
                        return 1
                    return 0
                ready.result()  # raises if a program exited
                first, last = pods[0][1], pods[-1][1]
                report(ports, kube, sts, server, agent, first=first, last=last)
                while not stopping.is_set():
                    # A program that dies is reported, and takes the stack down with it.
                    for program in (server, agent):
                        if program.exited is not None:
                            say(f"{program.name} exited with code {program.exited}; stopping")
                            return 1
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stopping.wait(), 0.5)
                say("stopping: the agent, then the server, then the test servers")
                return 0
            except RuntimeError as error:
                say(f"podiam did not start: {error}")
                return 1
            finally:
                await agent.stop()
                await server.stop()
    finally:
        await asyncio.to_thread(sts.stop)


def report(ports, kube, sts, server: Program, agent: Program, *, first: str, last: str) -> None:
    agent_url = f"http://{NODE}:{ports['agent']}"
    assert server.process is not None and agent.process is not None
    locust = [
        command_path("locust"), "-f", "bench/locustfile.py", "--host", agent_url,
        "--headless", "-u", str(PODS), "-r", "5", "-t", "1m",
    ]  # fmt: skip
    say("podiam is up (loopback variant: pods are 127.0.1.x addresses of this machine).")
    say(f"agent: {agent_url}")
    say(f"agent metrics: http://{NODE}:{ports['agent metrics']}/metrics")
    say(f"server: {NODE}:{ports['server']} (mutual-TLS gRPC)")
    say(f"server metrics: http://{NODE}:{ports['server metrics']}/metrics")
    say(f"pids: podiam-server {server.process.pid}, podiam-agent {agent.process.pid}")
    say(f"Kubernetes API test server: {kube.url}; moto (STS, metadata): {sts.endpoint_url}")
    say(f"pods: web-1 … web-{PODS} on {first} … {last} in namespace {NAMESPACE}, role {ROLE} "
        f"(permitted: '{PERMITTED}'); {INTRUDER[0]} on {INTRUDER[1]}, role {INTRUDER[2]} "
        "(not permitted)")  # fmt: skip
    say("As pod web-1 (curl sends from its address):")
    say(f"curl: curl --interface {first} {agent_url}{CREDS}{ROLE}")
    say(f"  role name: curl --interface {first} {agent_url}{CREDS}")
    say(f"  refused (403): curl --interface {INTRUDER[1]} {agent_url}{CREDS}")
    say("Load-test the agent, each locust user a pod:")
    say(f"locust: PODIAM_LOCUST_SOURCES={first}-{last} {shlex.join(locust)}")
    say("Ctrl-C (or SIGTERM) stops everything.")


async def namespace_up(stopping: asyncio.Event) -> int:
    # Imported here: the network-namespace kit needs root.
    from tests.support.e2e import AGENT_METRICS_PORT, AGENT_PORT, METADATA_URL, PodiamCluster

    say("building network namespaces: a server node, a worker node, pods behind the worker …")
    server_metrics = PREFERRED_PORTS["server metrics"]
    async with PodiamCluster(
        workers=1,
        permitted={NAMESPACE: PERMITTED},
        server_args=["--prometheus-listen-addr", f"0.0.0.0:{server_metrics}"],
    ) as podiam:
        worker = podiam.worker(0)
        web = podiam.add_pod(worker, NAMESPACE, "web", ROLE)
        intruder = podiam.add_pod(worker, NAMESPACE, INTRUDER[0], INTRUDER[2])
        assert podiam.server is not None and podiam.server_node is not None
        agent = podiam.agent(worker)
        in_web = shlex.join(web.netns.argv())
        locust = [
            *web.netns.argv(), command_path("locust"), "-f", "bench/locustfile.py",
            "--host", METADATA_URL, "--headless", "-u", "5", "-r", "5", "-t", "1m",
        ]  # fmt: skip
        say("podiam is up (network namespaces: the worker's DNAT rule sends pods' metadata")
        say("requests to its agent).")
        say(f"agent: http://{worker.ip}:{AGENT_PORT} (pods reach it as {METADATA_URL})")
        say(f"agent metrics: http://{worker.ip}:{AGENT_METRICS_PORT}/metrics")
        say(f"server: {podiam.server_address} (mutual-TLS gRPC)")
        say(f"server metrics: http://{podiam.server_node.ip}:{server_metrics}/metrics")
        assert podiam.server.process is not None and agent.process is not None
        say(f"pids: podiam-server {podiam.server.process.pid}, "
            f"podiam-agent {agent.process.pid}")  # fmt: skip
        say(f"logs: {podiam.server.log_path}, {agent.log_path}")
        for rule in agent.dnat_rules():
            say(f"DNAT rule on the worker node: iptables -t nat {rule}")
        say(f"pods: web on {web.ip}, role {ROLE} (namespace {NAMESPACE} permits '{PERMITTED}'); "
            f"{INTRUDER[0]} on {intruder.ip}, role {INTRUDER[2]} (not permitted)")  # fmt: skip
        say("As pod web (inside its network namespace):")
        say(f"curl: {in_web} curl {METADATA_URL}{CREDS}{ROLE}")
        say(f"  role name: {in_web} curl {METADATA_URL}{CREDS}")
        say(f"  refused (403): {shlex.join(intruder.netns.argv())} curl {METADATA_URL}{CREDS}")
        say("Load-test the agent from pod web:")
        say(f"locust: {shlex.join(locust)}")
        say("Ctrl-C (or SIGTERM) stops everything.")
        while not stopping.is_set():
            for program in podiam.processes:
                if program.returncode is not None:
                    say(f"{program.what} exited with code {program.returncode}; stopping")
                    return 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), 0.5)
        say("stopping: the agent, then the server, then the test servers and the namespaces")
    return 0


def main() -> int:
    async def run() -> int:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stopping.set)
        if variant == "namespaces":
            return await namespace_up(stopping)
        with tempfile.TemporaryDirectory(prefix="podiam-up-") as work:
            return await loopback_up(Path(work), stopping)

    variant = "namespaces"
    if (why_not := why_not_namespaces()) is not None:
        reason, then = why_not
        say(f"{reason}: running the loopback variant, where pods are 127.0.1.x addresses of")
        say(f"this machine and no DNAT rule is involved. {then} it shows the interception too.")
        variant = "loopback"

    logs.configure("WARNING", json_log=False)
    os.chdir(REPO)  # the printed commands name bench/locustfile.py relative to the repository
    say("starting podiam: moto, the Kubernetes API test server, podiam-server, podiam-agent …")
    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
