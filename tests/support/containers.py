"""podiam's images run by a real container runtime (podman) the way the Helm chart runs them.

The chart promises a lot that only a container runtime can hold it to: the server as uid 65532
with a read-only root filesystem, no capabilities and no privilege escalation, writing only to
its emptyDir; the agent with the node's network and nothing but NET_ADMIN and NET_RAW. Here the
chart is rendered, and each container's ``securityContext``, volumes, command and environment
are turned into podman's equivalents (``run_flags``) — so a change to the chart is what gets
tested, not a copy of it. The pods' ``hostNetwork`` is a node namespace of the netns kit
(``--network ns:/run/netns/<node>``), so ``ImageCluster`` is ``PodiamCluster`` with its server
and agents in containers: the same Kubernetes API, STS, DNAT rules and pods.

Images come from ``images/build.sh`` (``build_images``), which reuses its cached base and
podman's layer cache, so the tests run what the tree builds to now.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from certs.tls import TlsFiles
from tests.support import helm
from tests.support.e2e import (
    AGENT_PORT,
    BASE_ARN,
    REPO,
    SERVER_PORT,
    START_TIMEOUT,
    STOP_TIMEOUT,
    AgentProcess,
    PodiamCluster,
    PodiamProcess,
    ServerProcess,
    StartError,
)
from tests.support.moto_sts import FAKE_ACCESS_KEY_ID, FAKE_SECRET_ACCESS_KEY, REGION
from tests.support.netns import Node

BUILD_SCRIPT = REPO / "images" / "build.sh"
# As images/build.sh does: without systemd, podman needs the project's settings for such
# machines (unless CONTAINERS_CONF says otherwise).
PODMAN_ENV = dict(os.environ)
if "CONTAINERS_CONF" not in PODMAN_ENV and not Path("/run/systemd/system").is_dir():
    PODMAN_ENV["CONTAINERS_CONF"] = str(REPO / "images" / "containers.conf")
TAG = os.environ.get("PODIAM_IMAGE_TAG", "dev")  # what images/build.sh tags
_sequence = itertools.count(1)


def image(component: str) -> str:
    return f"localhost/podiam-{component}:{TAG}"


# ---------------------------------------------------------------- skipping, or failing in CI


def _problem() -> str | None:
    missing = [tool for tool in ("podman",) if shutil.which(tool) is None]
    if os.geteuid() != 0:
        return "image test: not running as root"
    return f"image test: missing {', '.join(missing)}" if missing else None


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


requires_podman = pytest.mark.skipif(
    _problem() is not None and not _in_ci(), reason=_problem() or ""
)


def demand_podman() -> None:
    """Skip (or, under CI=true, fail loudly) if podman cannot run here."""
    problem = _problem()
    if problem is None:
        return
    if _in_ci():
        pytest.fail(f"CI=true but {problem}", pytrace=False)
    pytest.skip(problem)


def podman(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["podman", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=PODMAN_ENV,
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(argv)} exited {result.returncode}: {result.stderr}")
    return result


@dataclass(frozen=True, slots=True)
class Images:
    agent: str
    server: str
    base: str  # the image both were built on


def build_images() -> Images:
    """Build both images with ``images/build.sh`` (fast when nothing changed) and name them."""
    demand_podman()
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT)],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
        env=PODMAN_ENV,
    )
    if result.returncode != 0:
        raise RuntimeError(f"images/build.sh exited {result.returncode}:\n{result.stderr}")
    # Its first line of output names the base image.
    base = result.stdout.split()[0]
    return Images(agent=image("agent"), server=image("server"), base=base)


# ---------------------------------------------------------------- the chart, as podman flags


def chart_pod(kind: str, values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The pod spec of the chart's server Deployment (``kind="Deployment"``) or agent
    DaemonSet, rendered with the chart's defaults plus ``values``."""
    manifests = helm.render({"server": {"roleBaseArn": BASE_ARN}, **(values or {})})
    return helm.one(manifests, kind)["spec"]["template"]["spec"]


# The pod fields the chart's containers read through the downward API, for a pod on ``node``.
POD_FIELDS = {
    "status.hostIP": lambda node: node.ip,
    "spec.nodeName": lambda node: node.node_name,
}


def chart_args(pod: Mapping[str, Any], overrides: Sequence[str]) -> list[str]:
    """The container's arguments as the chart renders them, with each flag that ``overrides``
    names (``--flag=value`` or ``--flag``) replaced by its value there: what differs in the
    test cluster (the server's address, STS, the kubeconfig) and nothing else."""
    (container,) = pod["containers"]
    names = {arg.split("=", 1)[0] for arg in overrides}
    kept = [arg for arg in container.get("args", []) if arg.split("=", 1)[0] not in names]
    return [*kept, *overrides]


def run_flags(
    pod: Mapping[str, Any],
    *,
    secrets: Mapping[str, Path],
    node: Node,
    scratch: Path,
) -> list[str]:
    """podman flags for the pod's one container: its security context, its volumes and its
    command. ``secrets`` maps a secret volume's name to a directory holding its items' keys as
    files (tls.crt, ...); they are copied under ``scratch`` with the volume's mode and group."""
    (container,) = pod["containers"]
    pod_context = pod.get("securityContext", {})
    context = {**pod_context, **container.get("securityContext", {})}
    flags: list[str] = []

    user, group = context.get("runAsUser"), context.get("runAsGroup")
    if context.get("runAsNonRoot") and user in (None, 0):
        raise AssertionError("runAsNonRoot with no non-root runAsUser: the kubelet would refuse")
    if user is not None:
        flags += ["--user", f"{user}:{group if group is not None else user}"]
    if "fsGroup" in pod_context:
        flags += ["--group-add", str(pod_context["fsGroup"])]
    if context.get("readOnlyRootFilesystem"):
        # podman's --read-only adds writable tmpfs on /tmp, /run and /var/tmp unless told not
        # to; the kubelet adds none, so only the pod's own volumes are writable.
        flags += ["--read-only", "--read-only-tmpfs=false"]
    if context.get("allowPrivilegeEscalation") is False:
        flags += ["--security-opt", "no-new-privileges"]
    capabilities = context.get("capabilities", {})
    flags += [f"--cap-drop={cap}" for cap in capabilities.get("drop", [])]
    flags += [f"--cap-add={cap}" for cap in capabilities.get("add", [])]
    seccomp = context.get("seccompProfile", {}).get("type")
    if seccomp not in (None, "RuntimeDefault"):
        raise AssertionError(f"no podman equivalent here for seccomp profile {seccomp}")

    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        target = mount["mountPath"]
        if "emptyDir" in volume:
            size = volume["emptyDir"].get("sizeLimit", "16Mi").removesuffix("i").lower()
            flags += ["--tmpfs", f"{target}:rw,size={size},mode=1777"]
        elif "secret" in volume:
            source = _secret_volume(volume, secrets[mount["name"]], scratch, pod_context)
            flags += ["--volume", f"{source}:{target}:ro"]
        elif "hostPath" in volume:
            path = Path(volume["hostPath"]["path"])
            if volume["hostPath"].get("type") == "FileOrCreate":
                path.touch(exist_ok=True)
            flags += ["--volume", f"{path}:{target}" + (":ro" if mount.get("readOnly") else "")]
        else:
            raise AssertionError(f"no podman equivalent here for volume {volume}")

    for variable in container.get("env", []):
        if "value" in variable:
            flags += ["--env", f"{variable['name']}={variable['value']}"]
        elif (field := variable["valueFrom"].get("fieldRef", {}).get("fieldPath")) in POD_FIELDS:
            flags += ["--env", f"{variable['name']}={POD_FIELDS[field](node)}"]
        else:
            raise AssertionError(f"no podman equivalent here for env {variable}")
    if "command" in container:
        flags += ["--entrypoint", json.dumps(container["command"])]
    return flags


def _secret_volume(
    volume: Mapping[str, Any], files: Path, scratch: Path, pod_context: Mapping[str, Any]
) -> Path:
    """A directory as the kubelet projects a secret: the items, with ``defaultMode``, owned by
    root and the pod's fsGroup."""
    secret = volume["secret"]
    directory = scratch / f"secret-{volume['name']}"
    directory.mkdir(parents=True)
    mode = secret.get("defaultMode", 0o644)
    group = pod_context.get("fsGroup", 0)
    for item in secret["items"]:
        target = directory / item["path"]
        shutil.copyfile(files / item["key"], target)
        os.chown(target, 0, group)
        os.chmod(target, mode)
    directory.chmod(0o755)
    return directory


def as_secret(files: TlsFiles, scratch: Path) -> Path:
    """A bundle's cert, key and CA under the Secret keys the chart reads (kubernetes.io/tls)."""
    scratch.mkdir(parents=True, exist_ok=True)
    for key, source in (("tls.crt", files.cert), ("tls.key", files.key), ("ca.crt", files.ca)):
        shutil.copyfile(source, scratch / key)
    return scratch


# ---------------------------------------------------------------- containers in the cluster


class ContainerProcess(PodiamProcess):
    """A podiam program in a container joined to its node's network namespace, started with
    ``podman run`` in the foreground: its output goes to the log, and SIGTERM to podman is
    passed on to the program, as the kubelet's stop is."""

    def __init__(
        self,
        node: Node,
        what: str,
        image: str,
        flags: Sequence[str],
        argv: Sequence[str],
        log: Path,
        pod: Mapping[str, Any],
    ) -> None:
        super().__init__(node, what, argv, {}, log)
        self.image = image
        self.flags = list(flags)
        self.pod = pod  # the chart's pod spec it runs as
        self.name = f"podiam-test-{os.getpid()}-{next(_sequence)}-{what}"

    async def start(self) -> None:
        if self.running:
            raise RuntimeError(f"{self} is already running")
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        argv = [
            "podman", "run", "--rm", "--pull=never", "--name", self.name,
            "--network", f"ns:/run/netns/{self.node.name}",
            *self.flags, self.image, *self.argv,
        ]  # fmt: skip
        try:
            self.process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                env=PODMAN_ENV,
            )
        finally:
            os.close(log)
        try:
            # A container takes a moment longer than a process to start.
            await asyncio.wait_for(self._until_ready(offset), START_TIMEOUT * 2)
        except TimeoutError:
            raise StartError(self._failure("not ready in time"), self) from None

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> int | None:
        code = await super().stop(sig)
        # Whatever podman did with the signal, no container outlives its test.
        await asyncio.to_thread(
            podman, "rm", "--force", "--time", "0", self.name, check=False, timeout=STOP_TIMEOUT * 3
        )
        return code

    async def probe(self, which: str) -> bool:
        """Run the chart's ``which`` probe (``readinessProbe``...) as the kubelet would: an exec
        in the container, or an HTTP GET to the pod's (here: the node's) address."""
        (container,) = self.pod["containers"]
        probe = container[which]
        if "exec" in probe:
            result = await asyncio.to_thread(self.exec, *probe["exec"]["command"])
            return result.returncode == 0
        port = probe["httpGet"]["port"]
        if isinstance(port, str):  # a named port
            port = next(p["containerPort"] for p in container["ports"] if p["name"] == port)
        answer = await self.node.fetch(
            f"http://{self.node.ip}:{port}{probe['httpGet']['path']}", timeout=1
        )
        return answer.status == 200

    def pid(self) -> int:
        """The program's process id, as the machine sees it."""
        return int(podman("inspect", "--format", "{{.State.Pid}}", self.name).stdout)

    def inspect(self) -> dict[str, Any]:
        return json.loads(podman("inspect", self.name).stdout)[0]

    def exec(self, *argv: str) -> subprocess.CompletedProcess:
        """Run ``argv`` in the container, as its user and with its capabilities."""
        return podman("exec", self.name, *argv, check=False)


class ServerContainer(ContainerProcess, ServerProcess):
    pass


class AgentContainer(ContainerProcess, AgentProcess):
    async def ready(self, offset: int = 0) -> bool:
        """Ready once the chart's readiness probe passes."""
        return self.running and await self.probe("readinessProbe")


def sweep_containers() -> list[str]:
    """Remove containers left by test runs that died (named ``podiam-test-<pid>-...``, their
    pid gone): a killed ``podman run`` leaves its container running. Live runs keep theirs."""
    names = podman("ps", "--all", "--format", "{{.Names}}").stdout.split()
    gone = [
        name
        for name in names
        if (match := re.fullmatch(r"podiam-test-(\d+)-\d+-\w+", name))
        and not Path(f"/proc/{match.group(1)}").exists()
    ]
    if gone:
        podman("rm", "--force", "--time", "0", *gone, check=False)
    return gone


class ImageCluster(PodiamCluster):
    """``PodiamCluster`` with its server and agents as containers of ``images``, each run as the
    chart's pod spec says (``run_flags``) with the chart's arguments (``chart_args``), but for
    what the test cluster has elsewhere: the server's address (a node's IP, not the Service
    name), STS and the upstream metadata service (moto), and the Kubernetes API, which the
    server reads from a mounted kubeconfig instead of its service account. Readiness is the
    chart's readiness probe for agents, the "serving gRPC" log line for the server."""

    def __init__(
        self, images: Images, *, values: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.images = images
        self.values = dict(values or {})  # the chart's values, beyond its defaults

    async def _start(self) -> None:
        await asyncio.to_thread(sweep_containers)
        await super()._start()

    async def _start_server(self, replica: int = 0) -> None:
        # One server container: the replica tests run on processes (tests/support/e2e.py).
        assert replica == 0, "ImageCluster runs one server container"
        assert self.kube is not None and self.sts is not None and self.server_node is not None
        scratch = self.work / "server"
        kubeconfig = self.work / "kubeconfig"
        self.kube.write_kubeconfig(str(kubeconfig))
        kubeconfig.chmod(0o644)
        pod = chart_pod("Deployment", self.values)
        secrets = {
            "tls": as_secret(TlsFiles.server_in(self.tls), scratch / "tls"),
            "probe-tls": as_secret(TlsFiles.agent_in(self.tls), scratch / "probe-tls"),
        }
        flags = [
            *run_flags(pod, secrets=secrets, node=self.server_node, scratch=scratch),
            "--volume", f"{kubeconfig}:/etc/podiam/kubeconfig:ro",
            "--env", f"AWS_ACCESS_KEY_ID={FAKE_ACCESS_KEY_ID}",
            "--env", f"AWS_SECRET_ACCESS_KEY={FAKE_SECRET_ACCESS_KEY}",
            "--env", "AWS_EC2_METADATA_DISABLED=true",
        ]  # fmt: skip
        argv = chart_args(
            pod,
            [
                f"--bind=0.0.0.0:{SERVER_PORT}",
                "--kubeconfig=/etc/podiam/kubeconfig",
                f"--role-base-arn={BASE_ARN}",
                f"--region={REGION}",
                f"--sts-endpoint={self.sts.endpoint_url}",
                *self.server_args,
            ],
        )
        log = self.work / "server.log"
        server = ServerContainer(
            self.server_node, "server", self.images.server, flags, argv, log, pod
        )
        self.servers.append(server)
        self.server = server
        self._stack.push_async_callback(server.stop)
        await server.start()

    async def _start_agent(self, node: Node) -> None:
        assert self.sts is not None and self.server_node is not None
        scratch = self.work / f"agent-{node.node_name}"
        pod = chart_pod("DaemonSet", self.values)
        secrets = {"tls": as_secret(TlsFiles.agent_in(self.tls), scratch / "tls")}
        flags = run_flags(pod, secrets=secrets, node=node, scratch=scratch)
        argv = chart_args(
            pod,
            [
                f"--port={AGENT_PORT}",
                f"--server-address={self.server_node.ip}:{SERVER_PORT}",
                f"--metadata-endpoint={self.sts.endpoint_url}",
                *self.agent_args,
            ],
        )
        log = self.work / f"agent-{node.node_name}.log"
        agent = AgentContainer(node, "agent", self.images.agent, flags, argv, log, pod)
        self.agents[node.node_name] = agent
        await agent.start()


def capabilities_of(pid: int) -> dict[str, int]:
    """A process's capability sets and no_new_privs flag, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            fields[key] = int(value.strip(), 16)
        elif key in ("NoNewPrivs", "Seccomp", "Uid", "Gid"):
            fields[key] = int(value.split()[0])
    return fields


CAPABILITY_BITS = {"NET_ADMIN": 12, "NET_RAW": 13}


def capability_mask(*names: str) -> int:
    mask = 0
    for name in names:
        mask |= 1 << CAPABILITY_BITS[name]
    return mask
