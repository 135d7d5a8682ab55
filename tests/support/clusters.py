"""One interface over the two Kubernetes APIs the tests know: the test double
(tests/support/kubeapi.py) and the real control plane (tests/support/controlplane.py).

A scenario written against ``Cluster`` runs on both (the ``cluster`` fixture is parametrised),
so the double cannot drift from the real API: whatever the double does that Kubernetes does
not, a shared scenario fails on one side. Each side does things its own way where it must —
the double is told what to do, the real cluster is asked through its API as an admin, and
kwok's fake kubelet starts the pods — but what a client of the API sees is meant to be the
same.

Clients under test reach either API through a ``TcpProxy``, so a scenario breaks watches the
way a network does. On the real cluster they authenticate with the token of the chart's own
server ServiceAccount, bound to the chart's own ClusterRole: every real scenario is also a
test of that role.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
import pytest
import pytest_asyncio
import yaml
from kubernetes_asyncio.client import ApiClient

from certs.tls import channel_credentials
from protos import kiam_pb2_grpc
from server.app import PodiamServer
from server.config import parse_config
from server.kubeconfig import load_api_client
from server.reflector import Reflector
from tests.support import helm
from tests.support.controlplane import (
    NODE_IP,
    POD_IP_ANNOTATION,
    ControlPlane,
    KubeClient,
    admin_client,
)
from tests.support.kubeapi import KubeApiServer
from tests.support.moto_sts import MotoSts, fake_session
from tests.support.server import server_argv
from tests.support.tcpproxy import TcpProxy
from tests.support.tls import TlsDirs
from tests.support.waiting import eventually
from tests.test_kube_watch import RecordingSink

_ips = (f"10.{200 + n // 62500}.{n // 250 % 250}.{n % 250 + 1}" for n in itertools.count())


def next_ip() -> str:
    """An IP no other pod of this test session has been given."""
    return next(_ips)


def unique(prefix: str) -> str:
    """A name no other test of this session uses (the real cluster lives all session)."""
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


class Cluster(Protocol):
    """What a scenario may do to a Kubernetes API, and learn from it."""

    name: str  # "double" or "real", for test ids
    kubeconfig: Path  # for the client under test, through ``proxy``
    proxy: TcpProxy
    patience: float  # seconds a scenario waits for something to reach a client

    async def add_namespace(
        self, name: str, annotations: Mapping[str, str] | None = None
    ) -> None: ...

    async def update_namespace(self, name: str, annotations: Mapping[str, str]) -> None: ...

    async def delete_namespace(self, name: str) -> None: ...

    async def add_pod(
        self,
        namespace: str,
        name: str,
        *,
        ip: str,
        annotations: Mapping[str, str] | None = None,
        phase: str = "Running",
    ) -> None:
        """Add a pod that runs on a node whose IP is NODE_IP, with ``ip``; return once it
        has that IP and phase."""

    async def set_pod(
        self,
        namespace: str,
        name: str,
        *,
        phase: str | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> None: ...

    async def delete_pod(self, namespace: str, name: str) -> None: ...

    async def resource_version(self) -> int:
        """The resourceVersion of the latest write to the cluster, of any kind."""

    async def compact(self) -> None:
        """Compact the storage's history up to now (etcd compaction)."""

    def compact_from_callback(self, resource: str) -> None:
        """Compact now, from synchronous code (a sink's callback), and return once a list of
        ``resource`` begun before can no longer be continued."""

    async def forget_watch_history(self) -> None:
        """Make every resourceVersion before now too old to watch from, as compaction plus
        the API server losing its watch cache (a restart, an upgrade) does: a client that
        resumes from one gets 410 Gone and must list again."""

    async def events(self, namespace: str) -> list[dict[str, Any]]: ...

    def requests(self, resource: str) -> Counter[str]:
        """How often the client under test asked for ``resource``: fresh ``list`` requests,
        ``page`` requests (continuations too), ``watch`` requests."""


# --------------------------------------------------------------------------------------------
# The test double.


class DoubleCluster:
    name = "double"
    patience = 5.0

    def __init__(self, kube: KubeApiServer, proxy: TcpProxy, kubeconfig: Path) -> None:
        self.kube = kube
        self.proxy = proxy
        self.kubeconfig = kubeconfig

    async def add_namespace(self, name: str, annotations: Mapping[str, str] | None = None) -> None:
        self.kube.add_namespace(name, annotations=annotations)

    async def update_namespace(self, name: str, annotations: Mapping[str, str]) -> None:
        self.kube.update_namespace(name, annotations=annotations)

    async def delete_namespace(self, name: str) -> None:
        self.kube.delete_namespace(name)

    async def add_pod(
        self,
        namespace: str,
        name: str,
        *,
        ip: str,
        annotations: Mapping[str, str] | None = None,
        phase: str = "Running",
    ) -> None:
        self.kube.add_pod(
            namespace, name, ip=ip, host_ip=NODE_IP, phase=phase, annotations=annotations,
            node_name="kwok-node-0",
        )  # fmt: skip

    async def set_pod(
        self,
        namespace: str,
        name: str,
        *,
        phase: str | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> None:
        changes: dict[str, Any] = {}
        if phase is not None:
            changes["phase"] = phase
        if annotations is not None:
            current = self.kube.store.get("pods", (namespace, name))["metadata"]
            changes["annotations"] = {**(current.get("annotations") or {}), **annotations}
        self.kube.update_pod(namespace, name, **changes)

    async def delete_pod(self, namespace: str, name: str) -> None:
        self.kube.delete_pod(namespace, name)

    async def resource_version(self) -> int:
        return self.kube.store.rv

    async def compact(self) -> None:
        self.kube.compact()

    def compact_from_callback(self, resource: str) -> None:
        self.kube.compact()

    async def forget_watch_history(self) -> None:
        self.kube.compact()  # the double's watches replay from its store's history

    async def events(self, namespace: str) -> list[dict[str, Any]]:
        return [e for e in self.kube.events if e["metadata"]["namespace"] == namespace]

    def requests(self, resource: str) -> Counter[str]:
        return Counter(
            list=self.kube.list_requests[resource],
            page=self.kube.list_pages[resource],
            watch=self.kube.watch_requests[resource],
        )


@asynccontextmanager
async def double_cluster(tmp: Path) -> AsyncIterator[DoubleCluster]:
    # Bookmarks every second, as the real API server sends one shortly before a watch's
    # timeoutSeconds: scenarios need not wait the default minute for one.
    async with KubeApiServer(bookmark_interval=1.0) as kube:
        kube.add_namespace("default")
        async with TcpProxy(kube.host, kube.port) as proxy:
            kubeconfig = tmp / "double.kubeconfig"
            kube.write_kubeconfig(str(kubeconfig))
            config = yaml.safe_load(kubeconfig.read_text())
            config["clusters"][0]["cluster"]["server"] = f"http://{proxy.address}"
            kubeconfig.write_text(yaml.safe_dump(config))
            yield DoubleCluster(kube, proxy, kubeconfig)


# --------------------------------------------------------------------------------------------
# The real control plane.


class RealCluster:
    name = "real"
    patience = 30.0  # a real API server on a shared two-core machine is slower

    def __init__(
        self,
        plane: ControlPlane,
        admin: KubeClient,
        proxy: TcpProxy,
        kubeconfig: Path,
        user: str,
    ) -> None:
        self.plane = plane
        self.admin = admin
        self.proxy = proxy
        self.kubeconfig = kubeconfig
        self.user = user  # the client under test's user name, as the audit log records it

    async def _ok(self, method: str, path: str, body: Any = None, **options: Any) -> dict:
        answer = await self.admin.request(method, path, body, **options)
        if not answer.ok:
            raise AssertionError(f"{method} {path}: HTTP {answer.status}: {answer.body}")
        return answer.body

    async def add_namespace(self, name: str, annotations: Mapping[str, str] | None = None) -> None:
        metadata: dict[str, Any] = {"name": name}
        if annotations:
            metadata["annotations"] = dict(annotations)
        await self._ok("POST", "/api/v1/namespaces", {"metadata": metadata})

        # Pods are refused until the controller manager has given the namespace its default
        # ServiceAccount (the ServiceAccount admission plugin); a real cluster has the race too.
        async def has_default_account() -> bool:
            path = f"/api/v1/namespaces/{name}/serviceaccounts/default"
            return (await self.admin.get(path)).ok

        await eventually(has_default_account, timeout=self.patience)

    async def update_namespace(self, name: str, annotations: Mapping[str, str]) -> None:
        await self.admin.merge_patch(
            f"/api/v1/namespaces/{name}", {"metadata": {"annotations": dict(annotations)}}
        )

    async def delete_namespace(self, name: str) -> None:
        await self._ok("DELETE", f"/api/v1/namespaces/{name}")

    async def add_pod(
        self,
        namespace: str,
        name: str,
        *,
        ip: str,
        annotations: Mapping[str, str] | None = None,
        phase: str = "Running",
    ) -> None:
        pod = {
            "metadata": {
                "name": name,
                "annotations": {**(annotations or {}), POD_IP_ANNOTATION: ip},
            },
            "spec": {
                # Bound straight to a kwok node: kwok's fake kubelet starts it with ``ip``.
                "nodeName": self.plane.node_names[0],
                "containers": [{"name": "app", "image": "podiam.test/app:none"}],
                "automountServiceAccountToken": False,
            },
        }
        path = f"/api/v1/namespaces/{namespace}/pods"
        await self._ok("POST", path, pod)

        async def running() -> bool:
            status = (await self.admin.get(f"{path}/{name}")).body.get("status", {})
            return status.get("phase") == "Running" and status.get("podIP") == ip

        await eventually(running, timeout=self.patience)
        if phase != "Running":
            await self.set_pod(namespace, name, phase=phase)

    async def set_pod(
        self,
        namespace: str,
        name: str,
        *,
        phase: str | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> None:
        path = f"/api/v1/namespaces/{namespace}/pods/{name}"
        if annotations is not None:
            await self._ok(
                "PATCH", path, {"metadata": {"annotations": dict(annotations)}},
                content_type="application/merge-patch+json",
            )  # fmt: skip
        if phase is not None:
            # The kubelet's part: a pod's phase lives in its status subresource.
            await self._ok(
                "PATCH", f"{path}/status", {"status": {"phase": phase}},
                content_type="application/merge-patch+json",
            )  # fmt: skip

    async def delete_pod(self, namespace: str, name: str) -> None:
        # No grace period: gone at once, as after the kubelet confirmed the containers ended.
        await self._ok(
            "DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}",
            params={"gracePeriodSeconds": "0"},
        )  # fmt: skip

    async def resource_version(self) -> int:
        return await asyncio.to_thread(self.plane.etcd_revision)

    async def compact(self) -> None:
        await asyncio.to_thread(self.plane.compact)

    def compact_from_callback(self, resource: str) -> None:
        # Blocks the event loop for up to the cache's poll period; the client is between
        # pages, waiting on nothing.
        self.plane.compact(known_to=[resource])

    async def forget_watch_history(self) -> None:
        # The API server serves watches from its watch cache, whose history outlives etcd's
        # compaction; it is lost when the API server restarts. Both, as in an upgrade.
        await asyncio.to_thread(self.plane.compact)
        await asyncio.to_thread(self.plane.stop_apiserver)
        self.plane.start_apiserver()
        await asyncio.to_thread(self.plane.wait_for_apiserver)

    async def events(self, namespace: str) -> list[dict[str, Any]]:
        return (await self._ok("GET", f"/api/v1/namespaces/{namespace}/events"))["items"]

    def requests(self, resource: str) -> Counter[str]:
        """Counted from the API server's audit log, for the client under test's user: a
        scenario that counts must be the only client with that identity at the time."""
        counts: Counter[str] = Counter()
        for record in self.plane.audit_records():
            ref = record.get("objectRef") or {}
            if record.get("user", {}).get("username") != self.user:
                continue
            if ref.get("resource") != resource or ref.get("subresource"):
                continue
            # A watch is recorded when its response starts, a list when it completes.
            stage, verb = record.get("stage"), record.get("verb")
            if verb == "watch" and stage == "ResponseStarted":
                counts["watch"] += 1
            elif verb == "list" and stage == "ResponseComplete":
                counts["page"] += 1
                if "continue=" not in record.get("requestURI", ""):
                    counts["list"] += 1
        return counts


# --------------------------------------------------------------------------------------------
# The chart's own identities on the real cluster.

RBAC_KINDS = frozenset(
    {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
)


@dataclass(frozen=True)
class ChartAccess:
    """The ServiceAccounts, roles and bindings of the rendered chart, applied to the real
    cluster, and a token for each ServiceAccount from the TokenRequest API."""

    manifests: list[dict[str, Any]]  # the RBAC objects as rendered
    server_account: str  # the user name the API server sees for the server's token
    server_token: str
    agent_account: str
    agent_token: str


def install_chart_rbac(plane: ControlPlane) -> ChartAccess:
    rendered = helm.render()
    rbac = [m for m in rendered if m["kind"] in RBAC_KINDS]
    applied = plane.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(rbac))
    assert applied.returncode == 0, f"kubectl apply of the chart's RBAC: {applied.stderr}"
    server = helm.one(rendered, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
    agent = helm.one(rendered, "DaemonSet")["spec"]["template"]["spec"]["serviceAccountName"]

    def token(account: str) -> str:
        made = plane.kubectl("create", "token", account, "-n", helm.NAMESPACE, "--duration", "6h")
        assert made.returncode == 0, f"kubectl create token {account}: {made.stderr}"
        return made.stdout.strip()

    return ChartAccess(
        manifests=rbac,
        server_account=f"system:serviceaccount:{helm.NAMESPACE}:{server}",
        server_token=token(server),
        agent_account=f"system:serviceaccount:{helm.NAMESPACE}:{agent}",
        agent_token=token(agent),
    )


@pytest.fixture(scope="session")
def chart_access(control_plane: ControlPlane) -> ChartAccess:
    return install_chart_rbac(control_plane)


@asynccontextmanager
async def real_cluster(plane: ControlPlane, access: ChartAccess) -> AsyncIterator[RealCluster]:
    async with admin_client(plane) as admin, TcpProxy("127.0.0.1", plane.port) as proxy:
        kubeconfig = plane.kubeconfig(
            f"podiam-server-{proxy.port}",
            token=access.server_token,
            server=f"https://{proxy.address}",
        )
        yield RealCluster(plane, admin, proxy, kubeconfig, access.server_account)


@pytest_asyncio.fixture(scope="module", params=["double", "real"])
async def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Cluster]:
    """The test double, then the real control plane (skipped outside CI when not built)."""
    if request.param == "double":
        async with double_cluster(tmp_path_factory.mktemp("double")) as double:
            yield double
        return
    plane = request.getfixturevalue("control_plane")
    access = request.getfixturevalue("chart_access")
    async with real_cluster(plane, access) as real:
        yield real


# --------------------------------------------------------------------------------------------
# Driving a reflector (the server's list/watch loop) against either cluster.


@contextlib.asynccontextmanager
async def api_client(cluster: Cluster) -> AsyncIterator[ApiClient]:
    """The server's own Kubernetes client, configured from the cluster's kubeconfig."""
    client = await load_api_client(str(cluster.kubeconfig))
    try:
        yield client
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def reflecting(
    cluster: Cluster, api: ApiClient, sink: RecordingSink, **options: Any
) -> AsyncIterator[Reflector]:
    """Run a reflector until the block ends; enter once its first list is complete."""
    options.setdefault("resource", "pods")
    options.setdefault("backoff_max", 0.5)
    reflector = Reflector(api, sink=sink, **options)
    task = asyncio.create_task(reflector.run())
    try:
        await eventually(lambda: reflector.synced.is_set() or task.done(), cluster.patience)
        if task.done():
            task.result()
        yield reflector
        assert not task.done(), "the reflector stopped on its own"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def add_pods(cluster: Cluster, namespace: str, *names: str, **options: Any) -> None:
    # A few at a time: the real cluster's kwok starts each one.
    limit = asyncio.Semaphore(8)

    async def add(name: str) -> None:
        async with limit:
            await cluster.add_pod(namespace, name, ip=next_ip(), **options)

    await asyncio.gather(*(add(name) for name in names))


def mine(sink: RecordingSink, namespace: str) -> set[str]:
    return {key for key in sink.names() if key.startswith(f"{namespace}/")}


# --------------------------------------------------------------------------------------------
# A podiam server against either cluster.


@dataclass
class RunningServer:
    server: PodiamServer
    tls: TlsDirs

    def channel(self) -> grpc.aio.Channel:
        target = f"localhost:{self.server.port}"
        return grpc.aio.secure_channel(target, channel_credentials(self.tls.agent))

    @staticmethod
    def stub(channel: grpc.aio.Channel) -> kiam_pb2_grpc.KiamServiceStub:
        return kiam_pb2_grpc.KiamServiceStub(channel)


@asynccontextmanager
async def podiam_server(
    kubeconfig: Path, sts: MotoSts, tls: TlsDirs, *, extra: list[str] | None = None
) -> AsyncIterator[RunningServer]:
    """The real server, in this process, using ``kubeconfig`` as its only Kubernetes access."""
    argv = server_argv(kubeconfig=kubeconfig, sts=sts, tls=tls, extra=extra)
    server = PodiamServer(parse_config(argv, environ={}), boto_session=fake_session())
    try:
        await server.start()
        yield RunningServer(server, tls)
    finally:
        await server.stop(grace=1)
