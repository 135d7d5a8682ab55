"""A real Kubernetes control plane for tests: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, and kwok playing the kubelets of fake nodes, as local processes on loopback.

The test double in tests/support/kubeapi.py speaks the list/watch protocol, but it has no RBAC, no
admission, no watch cache, no service-account tokens and no controllers. An EKS user's cluster
has all of them, so what podiam claims about its Kubernetes behaviour is also shown here,
against the real thing, built from source by tests/controlplane/build.sh.

Everything is as a real cluster has it, small: the API server accepts only TLS client
certificates signed by this cluster's CA and service-account tokens it signed itself, and
authorises with Node and RBAC; each component has its own identity (the controller manager is
``system:kube-controller-manager``, the scheduler ``system:kube-scheduler``), as the default
RBAC policy expects; only kwok, which plays every kubelet at once, and the tests' admin are
``system:masters``. Nothing is reachable from outside the machine.

``ControlPlane`` is synchronous (subprocesses and urllib): it is a session fixture, outside any
test's event loop. Tests talk to the API with ``KubeClient`` (aiohttp) in their own loop.
Every process is its own process group and dies with the test process (PR_SET_PDEATHSIG through
setpriv), so neither a failed start nor a killed pytest leaves a process behind.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs.authority import generate_ca
from tests.support import gocache

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "tests" / "controlplane" / "build.sh"
KWOK_STAGES = REPO / "tests" / "controlplane" / "kwok-stages.yaml"
BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
)
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
POD_IP_ANNOTATION = "podiam.test/pod-ip"  # honoured by kwok-stages.yaml
NODE_IP = "127.0.0.1"  # every fake node's InternalIP: tests connect from here as "the node"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
# Requests about what podiam reads and writes, with who made them and the URI (limit, continue,
# watch): enough for tests to count a client's lists, pages and watches.
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [
        {
            "level": "Metadata",
            "resources": [{"group": "", "resources": ["pods", "namespaces", "events", "nodes"]}],
        },
        {"level": "None"},
    ],
}
START_TIMEOUT = 180.0  # seconds; a loaded two-core machine takes tens of seconds


class ControlPlaneError(Exception):
    """A component did not start; the message carries the end of its log."""


# --------------------------------------------------------------------------------------------
# Finding the binaries.


def binaries_dir() -> Path:
    """Where tests/controlplane/build.sh puts (or would put) the binaries of the pinned
    versions; ``PODIAM_CONTROLPLANE_BIN`` overrides it."""
    return gocache.bin_dir(BUILD_SCRIPT, "PODIAM_CONTROLPLANE_BIN")


def missing_binaries(directory: Path) -> list[str]:
    return gocache.missing(directory, BINARIES)


def require_binaries() -> Path:
    """The binaries' directory; outside CI, skip the test when they are not built (under
    CI=true, fail)."""
    return gocache.require("Kubernetes control plane", BUILD_SCRIPT, binaries_dir(), BINARIES)


# --------------------------------------------------------------------------------------------
# Certificates and keys.


@dataclass(frozen=True, slots=True)
class CertFiles:
    cert: Path
    key: Path


class Pki:
    """This cluster's CA, and the certificates and keys its components present."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._ca_cert, self._ca_key = generate_ca(common_name="podiam test cluster CA")
        self.ca = directory / "ca.crt"
        self.ca.write_bytes(self._ca_cert.public_bytes(serialization.Encoding.PEM))
        # The API server signs service-account tokens with this key and the controller
        # manager signs the tokens it mints with it too; RSA, as clusters commonly use.
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.service_account_key = directory / "sa.key"
        self.service_account_pub = directory / "sa.pub"
        _write_key(self.service_account_key, sa_key)
        self.service_account_pub.write_bytes(
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def client(self, name: str, user: str, groups: Sequence[str] = ()) -> CertFiles:
        """A client certificate: the API server takes the CN as the user name and each O as
        a group."""
        subject = [x509.NameAttribute(NameOID.COMMON_NAME, user)]
        subject += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, group) for group in groups]
        return self._leaf(name, x509.Name(subject), ExtendedKeyUsageOID.CLIENT_AUTH, ())

    def serving(self, name: str, hosts: Sequence[str]) -> CertFiles:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        return self._leaf(name, subject, ExtendedKeyUsageOID.SERVER_AUTH, hosts)

    def _leaf(
        self, name: str, subject: x509.Name, usage: x509.ObjectIdentifier, hosts: Sequence[str]
    ) -> CertFiles:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if hosts:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_general_name(host) for host in hosts]),
                critical=False,
            )
        cert = builder.sign(self._ca_key, hashes.SHA256())
        files = CertFiles(self.directory / f"{name}.crt", self.directory / f"{name}.key")
        files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(files.key, key)
        return files


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


# --------------------------------------------------------------------------------------------
# Processes.


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# setpriv (util-linux) asks the kernel to SIGKILL the component when the thread that started it
# dies, so a pytest killed outright leaves nothing running either. Start components from the
# main thread: a worker thread's exit would take them with it.
_SETPRIV = shutil.which("setpriv")
_DIE_WITH_PARENT = [_SETPRIV, "--pdeathsig", "KILL", "--"] if _SETPRIV else []


class Component:
    """One process of the control plane, in its own process group, logging to a file."""

    def __init__(self, name: str, argv: Sequence[str], log: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [*_DIE_WITH_PARENT, *self.argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, for stop() to kill whole
            )

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM the process group, SIGKILL it if it lingers; always reaps. Stopping a
        component that already ended (and was reaped) signals nothing: its pid may be reused."""
        if self.process is None or self.process.returncode is not None:
            return
        self._signal_group(signal.SIGTERM)
        if not self._exited(timeout):
            self._signal_group(signal.SIGKILL)
            self._exited(10)
        # Exited but not yet reaped, the leader's pid cannot be reused: whatever it left in
        # its group (these binaries start nothing) goes too, then it is reaped.
        self._signal_group(signal.SIGKILL)
        self.process.wait()

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)

    def _exited(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the process to exit, without reaping it."""
        deadline = time.monotonic() + timeout
        while True:
            state = os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if state is not None:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------------------------
# Kubeconfigs.


def write_kubeconfig(
    path: Path,
    *,
    server: str,
    ca: Path,
    client: CertFiles | None = None,
    token: str | None = None,
) -> Path:
    user: dict[str, str] = {}
    if client is not None:
        user = {"client-certificate": str(client.cert), "client-key": str(client.key)}
    if token is not None:
        user["token"] = token
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "podiam-test", "cluster": {"server": server, "certificate-authority": str(ca)}}
        ],
        "users": [{"name": "podiam-test", "user": user}],
        "contexts": [
            {"name": "podiam-test", "context": {"cluster": "podiam-test", "user": "podiam-test"}}
        ],
        "current-context": "podiam-test",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


# --------------------------------------------------------------------------------------------
# The control plane.


class ControlPlane:
    """etcd, the three control-plane components and kwok, started in that order, stopped in
    the reverse; ``start`` either leaves all running or none."""

    def __init__(
        self,
        bin_dir: Path,
        workdir: Path,
        *,
        nodes: int = 2,
        apiserver_args: Sequence[str] = (),
        component_args: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.bin_dir = bin_dir
        self.workdir = workdir
        self.node_names = [f"kwok-node-{i}" for i in range(nodes)]
        self._apiserver_args = list(apiserver_args)
        # More flags for any component by name, after its own (a repeated flag's last value
        # wins): the scale bench tunes etcd, the controller manager and kwok this way.
        self._component_args = {name: list(args) for name, args in (component_args or {}).items()}
        self.components: list[Component] = []
        workdir.mkdir(parents=True, exist_ok=True)
        self.pki = Pki(workdir / "pki")
        self.etcd_port = free_port()
        self.etcd_url = f"http://127.0.0.1:{self.etcd_port}"
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.admin = self.pki.client("admin", "podiam-test-admin", ["system:masters"])
        self.admin_kubeconfig = self.kubeconfig("admin", client=self.admin)
        self.audit_log = workdir / "audit.log"

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        try:
            self._start_etcd()
            self._start_apiserver()
            self._start_controllers()
            self._create_nodes()
            self._wait_until_usable()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for component in reversed(self.components):
            component.stop()

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop_apiserver(self) -> None:
        """Stop the API server; etcd and everything else stay up. (Any thread.)"""
        self.component("kube-apiserver").stop()

    def start_apiserver(self) -> None:
        """Start the API server again on the same port and storage, as a control plane
        upgrade does: its watch cache starts afresh from etcd. (Main thread: see setpriv.)"""
        self.component("kube-apiserver").start()

    def wait_for_apiserver(self) -> None:
        """Block until the API server is ready. (Any thread.)"""
        self._wait_for(self.component("kube-apiserver"), self._apiserver_ready, "ready")

    def component(self, name: str) -> Component:
        return next(c for c in self.components if c.name == name)

    def pids(self) -> list[int]:
        return [c.pid for c in self.components if c.pid is not None]

    # --- for tests ------------------------------------------------------------------------------

    def kubeconfig(
        self,
        name: str,
        *,
        client: CertFiles | None = None,
        token: str | None = None,
        server: str | None = None,
    ) -> Path:
        """A kubeconfig for this cluster with a certificate or a bearer token; ``server``
        replaces the API server's address (e.g. with a proxy in front of it)."""
        return write_kubeconfig(
            self.workdir / f"{name}.kubeconfig",
            server=server or self.url,
            ca=self.pki.ca,
            client=client,
            token=token,
        )

    def ssl_context(self, client: CertFiles | None = None) -> ssl.SSLContext:
        """TLS that trusts this cluster's CA, presenting ``client`` (default: the admin)."""
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        client = client or self.admin
        context.load_cert_chain(str(client.cert), str(client.key))
        return context

    def kubectl(
        self, *args: str, input: str | None = None, kubeconfig: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl (as the admin unless ``kubeconfig`` says otherwise); never raises for
        its exit status, which the caller checks."""
        return subprocess.run(
            [
                str(self.bin_dir / "kubectl"),
                "--kubeconfig", str(kubeconfig or self.admin_kubeconfig),
                *args,
            ],
            input=input,
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip

    def audit_records(self) -> list[dict[str, Any]]:
        """The API server's audit log so far: one record per request about pods, namespaces,
        events and nodes (see AUDIT_POLICY), as a cluster's audit trail would have it."""
        try:
            text = self.audit_log.read_text()
        except FileNotFoundError:
            return []
        records = []
        for line in text.splitlines():
            with contextlib.suppress(ValueError):  # a line still being written
                records.append(json.loads(line))
        return records

    def etcd_revision(self) -> int:
        """etcd's current revision: Kubernetes' resourceVersion of the latest write."""
        answer = self._etcd("/v3/kv/range", {"key": _b64(b"/registry/health-probe")})
        return int(answer["header"]["revision"])

    def compact(self, *, known_to: Sequence[str] = ()) -> int:
        """Compact etcd's history up to now through etcd's own API, the way kube-apiservers
        do it among themselves: record the revision under ``compact_rev_key`` (which every API
        server watches), then compact. Returns the revision.

        The API server's watch cache keeps serving watches from its own history regardless;
        what it drops, within its next poll (15 s), are its list snapshots from before. With
        ``known_to`` (resource names) this returns only once the cache of each has done so:
        from then on, a continue token from before the compaction is 410 Gone.
        """
        probes = {resource: self._continue_token(resource) for resource in known_to}
        # One past the latest revision: everything before this call goes, including the
        # revision of any list or watch already made. The put itself is a write, so by the
        # time of the compaction that revision exists.
        revision = self.etcd_revision() + 1
        self._etcd(
            "/v3/kv/put",
            {"key": _b64(b"compact_rev_key"), "value": _b64(str(revision).encode())},
        )
        self._etcd("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        deadline = time.monotonic() + 60
        for resource, token in probes.items():
            if token is None:
                raise ValueError(f"compact(known_to=...): fewer than two {resource} to page")
            while self._api_status(f"/api/v1/{resource}?limit=1&continue={token}") != 410:
                if time.monotonic() > deadline:
                    raise ControlPlaneError(f"the {resource} cache never learnt of compaction")
                time.sleep(0.2)
        return revision

    def _continue_token(self, resource: str) -> str | None:
        page = self._api("GET", f"/api/v1/{resource}?limit=1")
        token = page.get("metadata", {}).get("continue")
        return urllib.parse.quote(token) if token else None

    # --- starting -----------------------------------------------------------------------------

    def _add(self, name: str, argv: Sequence[str]) -> Component:
        argv = [*argv, *self._component_args.get(name, ())]
        component = Component(name, argv, self.workdir / f"{name}.log")
        self.components.append(component)
        component.start()
        return component

    def _binary(self, name: str) -> str:
        return str(self.bin_dir / name)

    def _start_etcd(self) -> None:
        peer = f"http://127.0.0.1:{free_port()}"
        etcd = self._add(
            "etcd",
            [
                self._binary("etcd"),
                "--name", "podiam-test",
                "--data-dir", str(self.workdir / "etcd"),
                "--listen-client-urls", self.etcd_url,
                "--advertise-client-urls", self.etcd_url,
                "--listen-peer-urls", peer,
                "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"podiam-test={peer}",
                "--log-level", "warn",
                # Test data need not survive a power cut; fsync would dominate the run time.
                "--unsafe-no-fsync",
                # Progress notifications let the API server's watch cache learn of writes to
                # other resources, so bookmarks carry current resourceVersions.
                "--watch-progress-notify-interval", "1s",
            ],
        )  # fmt: skip
        self._wait_for(etcd, self._etcd_healthy, "healthy")

    def _start_apiserver(self) -> None:
        serving = self.pki.serving("apiserver", ["127.0.0.1", "localhost", "kubernetes"])
        apiserver = self._add(
            "kube-apiserver",
            [
                self._binary("kube-apiserver"),
                "--etcd-servers", self.etcd_url,
                "--bind-address", "127.0.0.1",
                "--advertise-address", "127.0.0.1",
                # The endpoint reconciler refuses a loopback address for the "kubernetes"
                # Service, which nothing here reaches from a pod anyway.
                "--endpoint-reconciler-type", "none",
                "--secure-port", str(self.port),
                "--tls-cert-file", str(serving.cert),
                "--tls-private-key-file", str(serving.key),
                "--client-ca-file", str(self.pki.ca),
                "--authorization-mode", "Node,RBAC",
                "--anonymous-auth=false",
                "--service-account-issuer", SERVICE_ACCOUNT_ISSUER,
                "--service-account-key-file", str(self.pki.service_account_pub),
                "--service-account-signing-key-file", str(self.pki.service_account_key),
                "--service-cluster-ip-range", "10.96.0.0/16",
                "--cert-dir", str(self.workdir / "apiserver-certs"),
                # Only the tests compact etcd (through etcd's API), so when is theirs to choose;
                # an API server compacts every five minutes by default. Not 0: that would also
                # stop it watching compact_rev_key, the way API servers learn of compactions.
                "--etcd-compaction-interval", "24h",
                "--audit-policy-file", str(self._write_audit_policy()),
                "--audit-log-path", str(self.audit_log),
                "--audit-log-format", "json",
                "--profiling=false",
                *self._apiserver_args,
            ],
        )  # fmt: skip
        self._wait_for(apiserver, self._apiserver_ready, "ready (/readyz)")

    def _write_audit_policy(self) -> Path:
        path = self.workdir / "audit-policy.yaml"
        path.write_text(yaml.safe_dump(AUDIT_POLICY))
        return path

    def _start_controllers(self) -> None:
        manager = self.pki.client("controller-manager", "system:kube-controller-manager")
        self._add(
            "kube-controller-manager",
            [
                self._binary("kube-controller-manager"),
                "--kubeconfig", str(self.kubeconfig("controller-manager", client=manager)),
                # Nothing asks the components' own health endpoints: serve none.
                "--secure-port", "0",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                "--service-account-private-key-file", str(self.pki.service_account_key),
                "--root-ca-file", str(self.pki.ca),
                "--profiling=false",
            ],
        )  # fmt: skip
        scheduler = self.pki.client("scheduler", "system:kube-scheduler")
        self._add(
            "kube-scheduler",
            [
                self._binary("kube-scheduler"),
                "--kubeconfig", str(self.kubeconfig("scheduler", client=scheduler)),
                "--secure-port", "0",
                "--leader-elect=false",
                "--profiling=false",
            ],
        )  # fmt: skip
        # kwok plays the kubelet of every fake node at once, so no per-node identity fits it.
        kwok = self.pki.client("kwok", "podiam-test-kwok", ["system:masters"])
        self._add(
            "kwok",
            [
                self._binary("kwok"),
                "--kubeconfig", str(self.kubeconfig("kwok", client=kwok)),
                "--config", str(KWOK_STAGES),
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector", f"{KWOK_NODE_ANNOTATION}=fake",
                "--node-ip", NODE_IP,
                "--cidr", "10.244.0.0/16",
                "--node-lease-duration-seconds", "40",
            ],
        )  # fmt: skip

    def _create_nodes(self) -> None:
        for index, name in enumerate(self.node_names):
            node = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "annotations": {KWOK_NODE_ANNOTATION: "fake"},
                    "labels": {"kubernetes.io/hostname": name, "type": "kwok"},
                },
                "spec": {"podCIDR": f"10.244.{index}.0/24", "podCIDRs": [f"10.244.{index}.0/24"]},
            }
            self._api("POST", "/api/v1/nodes", node)

    def _wait_until_usable(self) -> None:
        def ready() -> bool:
            # The controller manager works once it has made the default ServiceAccount (pods
            # cannot be created without one); kwok works once it reports its nodes Ready.
            account = self._api("GET", "/api/v1/namespaces/default/serviceaccounts/default")
            nodes = self._api("GET", "/api/v1/nodes")
            ready_nodes = {
                n["metadata"]["name"]
                for n in nodes.get("items", [])
                if any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in n.get("status", {}).get("conditions", [])
                )
            }
            return account.get("kind") == "ServiceAccount" and ready_nodes >= set(self.node_names)

        deadline = time.monotonic() + START_TIMEOUT
        while not ready():
            for component in self.components:
                if not component.running():
                    raise ControlPlaneError(self._failure(component, "exited"))
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    "control plane not usable in time (default ServiceAccount, Ready nodes):\n"
                    + "\n".join(self._failure(c, "log") for c in self.components)
                )
            time.sleep(0.2)

    def _wait_for(self, component: Component, check: Any, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if not component.running():
                raise ControlPlaneError(self._failure(component, "exited"))
            with contextlib.suppress(OSError, ValueError):
                if check():
                    return
            if time.monotonic() > deadline:
                raise ControlPlaneError(self._failure(component, f"not {what} in time"))
            time.sleep(0.2)

    @staticmethod
    def _failure(component: Component, what: str) -> str:
        return f"{component.name} {what}; end of {component.log}:\n{component.tail()}"

    # --- plumbing -------------------------------------------------------------------------------

    def _etcd_healthy(self) -> bool:
        with urllib.request.urlopen(f"{self.etcd_url}/health", timeout=2) as response:
            return json.load(response).get("health") == "true"

    def _etcd(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            self.etcd_url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def _apiserver_ready(self) -> bool:
        request = urllib.request.Request(f"{self.url}/readyz")
        try:
            with urllib.request.urlopen(request, timeout=2, context=self.ssl_context()) as answer:
                return answer.status == 200
        except urllib.error.HTTPError:
            return False

    def _api_status(self, path: str) -> int:
        request = urllib.request.Request(self.url + path)
        try:
            with urllib.request.urlopen(request, timeout=10, context=self.ssl_context()) as answer:
                return answer.status
        except urllib.error.HTTPError as error:
            with error:
                return error.code

    def _api(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """One admin request; an error answer comes back as its Status object."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10, context=self.ssl_context()) as answer:
                return json.load(answer)
        except urllib.error.HTTPError as error:
            with error:
                return json.loads(error.read() or b"{}")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --------------------------------------------------------------------------------------------
# An asynchronous client for tests: raw JSON, explicit content types, every status visible.


@dataclass
class Answer:
    status: int
    body: dict[str, Any]

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class KubeClient:
    """Raw HTTP to the API server as one identity (a client certificate or a bearer token).
    Unlike a generated client it never hides an answer: RBAC tests need the 403s."""

    def __init__(self, url: str, context: ssl.SSLContext, token: str | None = None) -> None:
        self.url = url
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context), headers=self._headers
        )

    async def close(self) -> None:
        await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
    ) -> Answer:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if data is not None else {}
        async with self._session.request(
            method, self.url + path, data=data, headers=headers, params=params
        ) as response:
            text = await response.text()
        try:
            parsed = json.loads(text) if text else {}
        except ValueError:
            parsed = {"message": text}
        return Answer(response.status, parsed)

    async def get(self, path: str, **params: str) -> Answer:
        return await self.request("GET", path, params=params or None)

    async def post(self, path: str, body: Any) -> Answer:
        return await self.request("POST", path, body)

    async def merge_patch(self, path: str, body: Any) -> Answer:
        return await self.request("PATCH", path, body, content_type="application/merge-patch+json")

    async def delete(self, path: str, **params: str) -> Answer:
        return await self.request("DELETE", path, params=params or None)

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def admin_client(plane: ControlPlane) -> KubeClient:
    return KubeClient(plane.url, plane.ssl_context())


def token_client(plane: ControlPlane, token: str) -> KubeClient:
    return KubeClient(plane.url, ssl.create_default_context(cafile=str(plane.pki.ca)), token)


# --------------------------------------------------------------------------------------------
# The fixture.


@contextlib.contextmanager
def running_control_plane(workdir: Path, **options: Any) -> Iterator[ControlPlane]:
    plane = ControlPlane(require_binaries(), workdir, **options)
    with plane:
        yield plane


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """One real control plane for the whole session (it takes tens of seconds to start)."""
    with running_control_plane(tmp_path_factory.mktemp("controlplane")) as plane:
        yield plane
