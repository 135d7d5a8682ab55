"""IP-reuse churn on a node with per-pod host routes: the agent's route evidence, measured.

The loopback ``churn`` fault has no per-pod routes, so there the agent learns that a pod is gone
only from the node stream, after the server has seen the deletion. A node with the AWS VPC CNI
(``eni*``) or Calico (``cali*``) gives each pod a veth and a /32 host route to its IP, and the
kubelet tears the pod's sandbox down (CNI DEL: veth and route gone) before it deletes the pod
object from the API. This fault builds that: a node network namespace holding the Kubernetes API
test double, moto, the server and the agent (in one process, so the moments the server and the
agent stop holding a pod can be read exactly), the agent's own iptables DNAT rule and netlink
route evidence, and pods as network namespaces whose veths are made and removed with pyroute2
by a "CNI" thread. Each IP of a small pool is handed from pod to pod across namespaces and roles
in kubelet order, while the pods holding it ask 169.254.169.254 through the DNAT rule.

``run`` (the bench side) builds the node namespace and starts this module inside it
(``python -m bench.fault_churn_routes``), which prints its figures as one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import signal
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import percentile

REPO = Path(__file__).resolve().parents[1]
CREDS = "/latest/meta-data/iam/security-credentials/"
METADATA = ("169.254.169.254", 80)
AGENT_PORT = 8181
NAMESPACES = ("churn-a", "churn-b", "churn-c")
ROLES = tuple(f"churn-role-{k}" for k in range(5))
ASKERS_PER_POD = 2
HOLD_SECONDS = 0.02  # each holder asks for this long before its pod is replaced
# Between one answer and an asker's next request: each pod asks up to 400 times a second, well
# inside the agent's fair share (2,000/s), so no answer is a 429.
PAUSE_SECONDS = 0.005
REQUEST_SECONDS = 5.0
_REQUEST = (
    f"GET {CREDS} HTTP/1.1\r\nHost: 169.254.169.254\r\nUser-Agent: churn-asker\r\n\r\n"
).encode()
_CLONE_NEWNET = 0x40000000
_NEVER = float("inf")
# The server recycles every connection this often (--max-connection-age), so that a run meets
# recycles on purpose: the shared channel's and the node stream's every 10 s or so (the agent
# moves its stream to a new connection at the GOAWAY, before the old one is cut 30 s later). A
# new pod asking meanwhile must be answered, not refused (issue 9).
MAX_CONNECTION_AGE = "10s"


# ---- the bench side -----------------------------------------------------------------------


async def run(section, options) -> None:
    from bench.real_client import problem

    netns_problem = problem()
    if netns_problem:
        section.notes.append(f"churn-routes fault skipped: {netns_problem}")
        return
    got = await measure(replacements=options.churn_replacements, ips=options.churn_ips)
    table = section.table(
        "IP reuse churn with per-pod host routes (network namespaces, real DNAT, netlink)",
        ["replacements", "IPs", "answers", "old role after the server saw the deletion",
         "old role to the new pod", "new pod failed after the server had it",
         "stale window p50 ms", "p99 ms", "max ms", "agent before server", "s"],
    )  # fmt: skip
    window = got["window_ms"]
    table.add(
        got["replacements"], got["ips"], got["answers"], got["old_role_after_server"],
        got["old_role_to_new_pod"], got["new_pod_failures"],
        window["p50"], window["p99"], window["max"],
        f"{got['agent_before_server']}/{got['replacements']}", got["seconds"],
    )  # fmt: skip
    lag = got["server_lag_ms"]
    section.notes.append(
        "churn-routes: each replacement in kubelet order — the old pod's askers stop, its "
        "sandbox goes (host veth deleted with pyroute2: its /32 route goes with it), its object "
        "is deleted from the API (the Kubernetes API test double), a new pod gets the same IP "
        "behind a new veth (new interface index), starts asking at once, and appears in the "
        "API. Stale window: from the moment the old veth's deletion was asked of the kernel to "
        "the agent no longer answering the IP with the old pod's role (its state polled every "
        "0.5 ms; it includes the kernel's own time to delete the veth). The server "
        f"dropped the old pod {lag['p50']} ms (p50; p99 {lag['p99']}, max {lag['max']}) after "
        "the veth's deletion was asked; 'agent before server' counts the replacements where the "
        "agent had stopped answering with the old role before the server dropped the pod. An "
        "answer counts as 'old role after the server saw the deletion' when it names a "
        "previous holder's role and was asked after the server had dropped that holder; 'new "
        "pod failed' counts answers other than its own role to requests asked once the server "
        f"held the new pod (those: {got['failures'] or 'none'}). Refusals before then (the pod "
        f"not yet in the API): {got['early_refusals'] or 'none'}. The server runs with "
        f"--max-connection-age {MAX_CONNECTION_AGE}: the agent moved its node stream to a new "
        f"connection {got['stream_handovers']} times during the run (at the server's GOAWAY, "
        f"before the cut) and lost it {got['stream_reconnects']} times; new pods asking "
        "meanwhile count in 'new pod failed' like any other (the agent's unary GetPodRole "
        f"calls, made when no stream could answer, by outcome: {got['role_calls'] or 'none'})"
    )
    for name, key in (
        ("churn-routes: old role served after the deletion reached the server",
         "old_role_after_server"),
        ("churn-routes: old role served to the new pod", "old_role_to_new_pod"),
        ("churn-routes: new pod failed once the server had it", "new_pod_failures"),
    ):  # fmt: skip
        section.check(name, "0", str(got[key]), got[key] == 0)


async def measure(*, replacements: int, ips: int, timeout: float = 7200.0) -> dict:  # noqa: ASYNC109 - the child is killed when it expires
    """Run the churn in a fresh node namespace and return its figures (see ``_summary``)."""
    from tests.support.netns import Cluster

    async with Cluster(prefix="podiam") as cluster:
        node = cluster.node("churn")
        done = await node.arun(
            sys.executable, "-m", "bench.fault_churn_routes",
            "--replacements", str(replacements), "--ips", str(ips),
            "--node-ip", node.ip, "--pod-prefix", f"10.201.{node.index}",
            env={"PYTHONPATH": str(REPO), "GRPC_ENABLE_FORK_SUPPORT": "0",
                 "GRPC_VERBOSITY": "ERROR"},
            timeout=timeout, check=False,
        )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"the churn-routes run failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- inside the node namespace: the CNI --------------------------------------------------------


@dataclass
class Sandbox:
    """A pod's network namespace (held open by ``fd``) and the node-side end of its veth."""

    ip: str
    fd: int
    index: int  # the host veth's interface index: what the agent's route evidence follows


class Cni:
    """Adds and removes pod sandboxes as a CNI plugin does (veth pair, the pod's address and
    default route inside, a /32 host route outside), with pyroute2, in its own thread: the
    agent shares this process, and the kernel calls (a veth deletion takes milliseconds) must
    not hold up its event loop. The thread switches network namespaces freely; only it does."""

    def __init__(self, node_ip: str) -> None:
        self._node_ip = node_ip
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cni")
        self._home = os.open("/proc/self/ns/net", os.O_RDONLY)
        self._ipr = None
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._serial = 0

    async def add(self, ip: str) -> Sandbox:
        self._serial += 1
        name = f"eni{self._serial:011x}"  # as the AWS VPC CNI names host veths
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._add, ip, name)

    async def delete(self, sandbox: Sandbox) -> float:
        """Remove the veth (its route goes with it) and the namespace; returns the moment the
        veth's deletion was asked of the kernel (the route is gone some time in the call)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._delete, sandbox)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._ipr is not None:
            self._ipr.close()

    def _add(self, ip: str, name: str) -> Sandbox:
        from pyroute2 import IPRoute
        from pyroute2.netns import setns

        if self._ipr is None:
            self._ipr = IPRoute()
        node = self._ipr
        if self._libc.unshare(_CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) failed")
        try:
            fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            inside = IPRoute()
        finally:
            setns(self._home, flags=0)
        try:
            node.link("add", ifname=name, kind="veth", peer={"ifname": "eth0", "net_ns_fd": fd})
            index = node.link_lookup(ifname=name)[0]
            inside.link("set", index=inside.link_lookup(ifname="lo")[0], state="up")
            eth0 = inside.link_lookup(ifname="eth0")[0]
            inside.addr("add", index=eth0, address=ip, prefixlen=32)
            inside.link("set", index=eth0, state="up")
            inside.route("add", dst=f"{self._node_ip}/32", oif=eth0, scope=253)  # link
            inside.route("add", dst="0.0.0.0/0", gateway=self._node_ip, oif=eth0)
            node.link("set", index=index, state="up")
            node.route("add", dst=f"{ip}/32", oif=index)
        except BaseException:
            os.close(fd)
            raise
        finally:
            inside.close()
        return Sandbox(ip, fd, index)

    def _delete(self, sandbox: Sandbox) -> float:
        asked = time.monotonic()
        self._ipr.link("del", index=sandbox.index)
        os.close(sandbox.fd)
        return asked


def pod_socket(sandbox: Sandbox) -> socket.socket:
    """A TCP socket in the pod's namespace. The switch and back happen on this thread with
    nothing awaited between them, so nothing else on the event loop runs in the pod's."""
    from pyroute2.netns import setns

    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        setns(sandbox.fd, flags=0)
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            setns(home, flags=0)
    finally:
        os.close(home)
    sock.setblocking(False)
    return sock


# ---- inside the node namespace: pods and what they are told ------------------------------------


@dataclass
class Pod:
    serial: int
    namespace: str
    name: str
    role: str
    sandbox: Sandbox
    uid: str = ""
    # (asked, answered, status or None, body), every answer its askers got
    answers: list[tuple[float, float, int | None, str]] = field(default_factory=list)
    askers: list[asyncio.Task] = field(default_factory=list)
    stopped: bool = False
    server_had: float = _NEVER  # the server's registry first held this pod at its IP
    server_dropped: float = _NEVER  # ... and no longer did


async def ask(pod: Pod) -> None:
    """Ask continuously, as a pod's SDK would, over keep-alive connections through the DNAT
    rule; a broken connection is replaced. Stops when the pod's containers stop."""
    loop = asyncio.get_running_loop()
    while not pod.stopped:
        sock = pod_socket(pod.sandbox)
        writer = None
        asked = time.monotonic()
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation.
            async with asyncio.timeout(REQUEST_SECONDS):
                await loop.sock_connect(sock, METADATA)
            reader, writer = await asyncio.open_connection(sock=sock)
            while not pod.stopped:
                asked = time.monotonic()
                writer.write(_REQUEST)
                async with asyncio.timeout(REQUEST_SECONDS):
                    status, body = await _response(reader)
                pod.answers.append((asked, time.monotonic(), status, body))
                await asyncio.sleep(PAUSE_SECONDS)
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
            pod.answers.append((asked, time.monotonic(), None, ""))
            await asyncio.sleep(0.01)
        finally:
            if writer is not None:
                writer.close()
            sock.close()


async def _response(reader: asyncio.StreamReader) -> tuple[int, str]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    body = await reader.readexactly(length) if length else b""
    return status, body.decode(errors="replace")


@dataclass
class Tally:
    answers: int = 0
    old_role_after_server: int = 0
    old_role_to_new_pod: int = 0
    new_pod_failures: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # of the new pods, by answer
    early_refusals: dict[str, int] = field(default_factory=dict)

    def judge(self, pod: Pod, earlier: list[Pod]) -> None:
        """Count ``pod``'s answers against the pods that held its IP before it."""
        for asked, _answered, status, body in pod.answers:
            self.answers += 1
            if status == 200 and body == pod.role:
                continue
            former = [p for p in earlier if status == 200 and p.role == body]
            if former:
                self.old_role_to_new_pod += 1
                if any(asked > p.server_dropped for p in former):
                    self.old_role_after_server += 1
            elif asked >= pod.server_had:
                self.new_pod_failures += 1
                key = f"{status} {body[:80]}" if status is not None else "no answer"
                self.failures[key] = self.failures.get(key, 0) + 1
            else:
                key = str(status) if status is not None else "no answer"
                self.early_refusals[key] = self.early_refusals.get(key, 0) + 1
        pod.answers.clear()


async def churn(*, replacements: int, pool: int, node_ip: str, pod_prefix: str) -> dict:
    from certs.authority import DEFAULT_SERVER_NAMES, generate_bundle, write_bundle
    from certs.tls import TlsFiles
    from tests.support.agent import running_agent
    from tests.support.kubeapi import KubeApiServer
    from tests.support.moto_sts import MotoSts
    from tests.support.server import running_server
    from tests.support.tls import TlsDirs

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, _print_tasks)
    work = Path(tempfile.mkdtemp(prefix="podiam-churn-routes-"))
    kube, sts = KubeApiServer(), MotoSts()
    await kube.start()
    await asyncio.to_thread(sts.start)
    cni = Cni(node_ip)
    tally = Tally()
    windows: list[float] = []  # old veth gone → agent no longer answers with the old role
    server_lags: list[float] = []  # old veth gone → server dropped the old pod
    agent_first = done = 0
    pods: list[Pod] = []
    try:
        for namespace in NAMESPACES:
            kube.add_namespace(namespace, annotations={"iam.amazonaws.com/permitted": ".*"})
        # The agent reaches the server at the node's address, as from another node: node
        # binding then sees the agent's node in its peer address, and the pods' hostIP.
        good = work / "tls"
        write_bundle(generate_bundle(server_names=[*DEFAULT_SERVER_NAMES, node_ip]), good)
        server_files, agent_files = TlsFiles.server_in(good), TlsFiles.agent_in(good)
        tls = TlsDirs(good, good, server_files, agent_files, agent_files, server_files)
        flags = ["--bind", f"{node_ip}:0", "--max-connection-age", MAX_CONNECTION_AGE]
        async with running_server(kube, sts, tls, work, extra=flags) as served:
            registry = served.server.registry
            extra = ["--host", node_ip, "--port", str(AGENT_PORT), "--iptables",
                     "--host-interface", "eni+",
                     "--server-address", f"{node_ip}:{served.server.port}"]  # fmt: skip
            async with running_agent(
                server_port=served.server.port, tls=tls, metadata="http://127.0.0.1:9", extra=extra
            ) as agent:
                await asyncio.wait_for(agent.streams.synced_once.wait(), 15)
                await _until(lambda: agent.routes.watching, "watching host routes")

                def role_at(ip: str) -> str | None:
                    entry = agent.state.usable_entry(ip)
                    return entry.role if entry is not None else None

                def server_uid(ip: str) -> str | None:
                    found = registry.lookup(ip).pod
                    return found.uid if found is not None else None

                async def start_pod(k: int, ip: str, previous: Pod | None) -> Pod:
                    namespace, name = NAMESPACES[k % len(NAMESPACES)], f"p{k}"
                    role = ROLES[k % len(ROLES)]
                    if previous is not None and role == previous.role:
                        role = ROLES[(ROLES.index(role) + 1) % len(ROLES)]
                    sandbox = await cni.add(ip)
                    pod = Pod(k, namespace, name, role, sandbox)
                    pods.append(pod)
                    # Its containers start with the sandbox: they ask before the kubelet has
                    # written the pod's IP to the API.
                    pod.askers = [asyncio.create_task(ask(pod)) for _ in range(ASKERS_PER_POD)]
                    annotations = {"iam.amazonaws.com/role": role,
                                   "iam.amazonaws.com/session-name": role}  # fmt: skip
                    made = kube.add_pod(namespace, name, ip=ip, host_ip=node_ip,
                                        annotations=annotations)  # fmt: skip
                    pod.uid = made["metadata"]["uid"]
                    return pod

                async def stop_askers(pod: Pod) -> None:
                    pod.stopped = True
                    for task in pod.askers:
                        task.cancel()
                    await asyncio.gather(*pod.askers, return_exceptions=True)

                async def confirmed(holder: Pod, ip: str) -> None:
                    """Until the server holds the new pod, then until the agent serves it."""
                    await _until(
                        lambda: server_uid(ip) == holder.uid, f"{ip}: {holder.name} at the server"
                    )
                    holder.server_had = time.monotonic()
                    await _until(
                        lambda: role_at(ip) == holder.role,
                        f"{ip}: {holder.name} served by the agent",
                    )

                async def one_ip(index: int, count: int) -> None:
                    nonlocal agent_first, done
                    ip = f"{pod_prefix}.{index + 1}"
                    earlier: list[Pod] = []
                    k = index
                    holder = await start_pod(k, ip, None)
                    await confirmed(holder, ip)
                    for _ in range(count):
                        await asyncio.sleep(HOLD_SECONDS)
                        old = holder
                        # kubelet order: containers stopped, sandbox torn down (CNI DEL), the
                        # object deleted; then the IP's next pod gets its sandbox (CNI ADD) and
                        # its IP written to the API.
                        await stop_askers(old)
                        watch = asyncio.create_task(_drops(old, ip, role_at, server_uid))
                        gone = await cni.delete(old.sandbox)
                        kube.delete_pod(old.namespace, old.name)
                        k += pool
                        holder = await start_pod(k, ip, old)
                        agent_dropped, old.server_dropped = await watch
                        windows.append(agent_dropped - gone)
                        server_lags.append(old.server_dropped - gone)
                        agent_first += agent_dropped < old.server_dropped
                        await confirmed(holder, ip)
                        tally.judge(old, earlier)
                        earlier = [*earlier[-3:], old]
                        done += 1
                        if done % 500 == 0:
                            print(f"churn-routes: {done} replacements", file=sys.stderr)
                    await stop_askers(holder)
                    tally.judge(holder, earlier)

                per_ip = [replacements // pool + (1 if i < replacements % pool else 0)
                          for i in range(pool)]  # fmt: skip
                started = time.monotonic()
                await asyncio.gather(*(one_ip(i, n) for i, n in enumerate(per_ip)))
                elapsed = time.monotonic() - started
                reconnects = _counter("podiam_agent_node_stream_reconnects_total")
                handovers = _counter("podiam_agent_node_stream_handovers_total")
                role_calls = _role_calls()
    finally:
        for pod in pods:
            for task in pod.askers:
                task.cancel()
        cni.close()
        for pod in pods:
            with contextlib.suppress(OSError):
                os.close(pod.sandbox.fd)
        await asyncio.to_thread(sts.stop)
        await kube.stop()
    return _summary(
        replacements=sum(per_ip), pool=pool, tally=tally, windows=windows,
        server_lags=server_lags, agent_first=agent_first, elapsed=elapsed,
        reconnects=reconnects, handovers=handovers, role_calls=role_calls,
    )  # fmt: skip


def _counter(name: str) -> int:
    # The agent runs in this process: its metrics count the node streams that ended, and those
    # moved to a new connection ahead of the server's cut.
    from prometheus_client import REGISTRY

    return int(REGISTRY.get_sample_value(name) or 0)


def _role_calls() -> dict[str, int]:
    # The agent's unary GetPodRole calls (made while no stream could answer), by outcome.
    from prometheus_client import REGISTRY

    return {
        sample.labels["outcome"]: int(sample.value)
        for metric in REGISTRY.collect()
        if metric.name == "podiam_agent_fallback_calls"
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels.get("rpc") == "GetPodRole"
    }


async def _drops(pod: Pod, ip: str, role_at, server_uid) -> tuple[float, float]:
    """When the agent stopped answering ``ip`` with ``pod``'s role, and when the server's
    registry stopped holding ``pod`` there (polled every 0.5 ms)."""
    agent = server = _NEVER
    deadline = time.monotonic() + 60
    while agent == _NEVER or server == _NEVER:
        now = time.monotonic()
        if now > deadline:
            raise RuntimeError(f"{ip}: the old pod was still held 60 s after its deletion")
        if agent == _NEVER and role_at(ip) != pod.role:
            agent = now
        if server == _NEVER and server_uid(ip) != pod.uid:
            server = now
        await asyncio.sleep(0.0005)
    return agent, server


async def _until(condition, what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not {what} after {seconds:g} s")
        await asyncio.sleep(0.0005)


def _print_tasks() -> None:
    for task in asyncio.all_tasks():
        task.print_stack(limit=4, file=sys.stderr)


def _summary(
    *,
    replacements,
    pool,
    tally,
    windows,
    server_lags,
    agent_first,
    elapsed,
    reconnects,
    handovers,
    role_calls,
) -> dict:
    def spread(values: list[float]) -> dict[str, float]:
        values = sorted(values)
        return {
            "p50": round(percentile(values, 0.5) * 1000, 2),
            "p99": round(percentile(values, 0.99) * 1000, 2),
            "max": round((values[-1] if values else 0.0) * 1000, 2),
        }

    return {
        "replacements": replacements,
        "ips": pool,
        "answers": tally.answers,
        "old_role_after_server": tally.old_role_after_server,
        "old_role_to_new_pod": tally.old_role_to_new_pod,
        "new_pod_failures": tally.new_pod_failures,
        "failures": tally.failures,
        "early_refusals": tally.early_refusals,
        "window_ms": spread(windows),
        "server_lag_ms": spread(server_lags),
        "agent_before_server": agent_first,
        "seconds": round(elapsed, 1),
        "stream_reconnects": reconnects,
        "stream_handovers": handovers,
        "role_calls": role_calls,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replacements", type=int, required=True)
    parser.add_argument("--ips", type=int, required=True)
    parser.add_argument("--node-ip", required=True, help="the node's address: the DNAT target")
    parser.add_argument("--pod-prefix", required=True, help="pods are <prefix>.1, .2, ...")
    args = parser.parse_args(argv)
    if not 1 <= args.ips <= 250:
        parser.error("--ips must lie between 1 and 250")
    import faulthandler

    import uvloop  # the agent's own loop (agent/__main__.py)

    faulthandler.register(signal.SIGUSR1)  # where a stuck run is: kill -USR1 <pid>

    from bench.cluster import quiet_logs

    quiet_logs()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        figures = runner.run(
            churn(replacements=args.replacements, pool=args.ips, node_ip=args.node_ip,
                  pod_prefix=args.pod_prefix)
        )  # fmt: skip
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
