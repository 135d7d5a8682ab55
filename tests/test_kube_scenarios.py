"""What the server sees of Kubernetes, written once and run against both the test double and the
real control plane (kube-apiserver with etcd, the controller manager, the scheduler and kwok).

On the real side every client under test holds the token of the chart's own server
ServiceAccount, so each scenario also shows the chart's ClusterRole is enough for it. A
scenario that passes on the double and fails on the real API means the double has drifted.
Each test works in namespaces of its own: the real cluster lives for the whole session.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from kubernetes_asyncio.client import ApiClient

from protos import kiam_pb2
from server.pods import UNFINISHED_PODS
from tests.support.clusters import (
    Cluster,
    add_pods,
    api_client,
    mine,
    next_ip,
    podiam_server,
    reflecting,
    unique,
)
from tests.support.waiting import eventually
from tests.test_kube_watch import RecordingSink

PERMITTED = "iam.amazonaws.com/permitted"
ROLE = "iam.amazonaws.com/role"

pytestmark = pytest.mark.timeout(300)


@pytest_asyncio.fixture
async def api(cluster: Cluster) -> AsyncIterator[ApiClient]:
    async with api_client(cluster) as client:
        yield client


# --- listing ----------------------------------------------------------------------------------


async def test_paged_list_reaches_exactly_every_pod(cluster: Cluster, api: ApiClient):
    ns = unique("paged")
    await cluster.add_namespace(ns)
    await add_pods(cluster, ns, *(f"pod-{i}" for i in range(60)))
    before = cluster.requests("pods")
    sink = RecordingSink()

    async with reflecting(cluster, api, sink, page_size=25):
        pass

    assert mine(sink, ns) == {f"{ns}/pod-{i}" for i in range(60)}
    made = cluster.requests("pods") - before
    assert made["list"] == 1
    assert made["page"] == math.ceil(len(sink.objects) / 25) >= 3


async def test_namespaces_are_reflected_with_their_annotations(cluster: Cluster, api: ApiClient):
    ns = unique("team")
    await cluster.add_namespace(ns, annotations={PERMITTED: "team-.*"})
    sink = RecordingSink()

    async with reflecting(cluster, api, sink, resource="namespaces"):
        assert sink.objects[ns]["metadata"]["annotations"][PERMITTED] == "team-.*"
        await cluster.update_namespace(ns, annotations={PERMITTED: ".*"})
        await eventually(
            lambda: sink.objects[ns]["metadata"]["annotations"].get(PERMITTED) == ".*",
            cluster.patience,
        )
        await cluster.delete_namespace(ns)
        await eventually(lambda: ns not in sink.names(), cluster.patience)
    assert ns in sink.deleted


async def test_expired_continue_token_restarts_the_list_from_scratch(
    cluster: Cluster, api: ApiClient
):
    ns = unique("expire")
    await cluster.add_namespace(ns)
    await add_pods(cluster, ns, *(f"p{i:02}" for i in range(30)))
    compacted = False

    def compact_during_first_page(_: dict[str, Any]) -> None:
        nonlocal compacted
        if not compacted:
            compacted = True
            # Between pages: the snapshot the continue token refers to is compacted away.
            cluster.compact_from_callback("pods")

    sink = RecordingSink(on_upsert=compact_during_first_page)
    before = cluster.requests("pods")
    async with reflecting(cluster, api, sink, page_size=10):
        pass

    assert mine(sink, ns) == {f"{ns}/p{i:02}" for i in range(30)}
    assert (cluster.requests("pods") - before)["list"] == 2
    assert sink.relists_begun == 2 and sink.relists_ended == 1


async def test_deleting_a_namespace_removes_its_pods_too(cluster: Cluster, api: ApiClient):
    ns = unique("doomed")
    await cluster.add_namespace(ns)
    await add_pods(cluster, ns, "a", "b")
    pods, namespaces = RecordingSink(), RecordingSink()

    async with (
        reflecting(cluster, api, pods),
        reflecting(cluster, api, namespaces, resource="namespaces"),
    ):
        assert mine(pods, ns) == {f"{ns}/a", f"{ns}/b"}
        await cluster.delete_namespace(ns)
        # The namespace controller deletes what is in it (kwok's kubelet confirms each pod
        # gone), then the namespace itself.
        await eventually(lambda: not mine(pods, ns), cluster.patience)
        await eventually(lambda: ns not in namespaces.names(), cluster.patience)
    assert {f"{ns}/a", f"{ns}/b"} <= set(pods.deleted)


# --- watching ---------------------------------------------------------------------------------


async def test_added_modified_and_deleted_pods_reach_the_sink(cluster: Cluster, api: ApiClient):
    ns = unique("churn")
    await cluster.add_namespace(ns)
    await add_pods(cluster, ns, "stays", "goes")
    sink = RecordingSink()

    async with reflecting(cluster, api, sink):
        await add_pods(cluster, ns, "new")
        await cluster.set_pod(ns, "stays", annotations={ROLE: "reader"})
        await cluster.delete_pod(ns, "goes")

        await eventually(lambda: mine(sink, ns) == {f"{ns}/stays", f"{ns}/new"}, cluster.patience)
        await eventually(
            lambda: sink.objects[f"{ns}/stays"]["metadata"]["annotations"].get(ROLE) == "reader",
            cluster.patience,
        )
    assert f"{ns}/goes" in sink.deleted


async def test_watch_broken_by_the_network_resumes_without_relisting(
    cluster: Cluster, api: ApiClient
):
    ns = unique("resume")
    await cluster.add_namespace(ns)
    await add_pods(cluster, ns, "a", "b", "c")
    sink = RecordingSink()

    async with reflecting(cluster, api, sink):
        before = cluster.requests("pods")
        with cluster.proxy.down():
            # While no watch can reach the API server:
            await add_pods(cluster, ns, "d")
            await cluster.set_pod(ns, "a", phase="Succeeded")
            await cluster.delete_pod(ns, "b")

        await eventually(
            lambda: mine(sink, ns) == {f"{ns}/a", f"{ns}/c", f"{ns}/d"}, cluster.patience
        )
        await eventually(lambda: sink.phase(f"{ns}/a") == "Succeeded", cluster.patience)
        made = cluster.requests("pods") - before
        assert made["watch"] >= 1 and made["list"] == 0
    assert sink.relists_begun == 1
    assert f"{ns}/b" in sink.deleted


async def test_watch_that_times_out_is_resumed_without_relisting(cluster: Cluster, api: ApiClient):
    ns = unique("timeout")
    await cluster.add_namespace(ns)
    sink = RecordingSink()

    async with reflecting(cluster, api, sink, watch_timeout=1):
        before = cluster.requests("pods")
        await eventually(lambda: cluster.requests("pods")["watch"] >= before["watch"] + 2, 15)
        await add_pods(cluster, ns, "after-timeout")
        await eventually(lambda: f"{ns}/after-timeout" in sink.objects, cluster.patience)
        assert (cluster.requests("pods") - before)["list"] == 0
    assert sink.relists_begun == 1


async def test_bookmarks_advance_the_resume_version_without_pod_changes(
    cluster: Cluster, api: ApiClient
):
    upserts = 0

    def count(_: dict[str, Any]) -> None:
        nonlocal upserts
        upserts += 1

    sink = RecordingSink(on_upsert=count)
    # The real API server sends a bookmark shortly before timeoutSeconds; the double, with
    # its bookmark interval of a second, sooner.
    async with reflecting(cluster, api, sink, watch_timeout=5) as reflector:
        listed = upserts
        await cluster.add_namespace(unique("unrelated"))  # a write, but to no pod
        written = await cluster.resource_version()

        await eventually(lambda: int(reflector.resource_version or 0) >= written, 20)
        assert upserts == listed


async def test_changes_missed_while_history_was_lost_are_applied_by_a_relist(
    cluster: Cluster, api: ApiClient
):
    ns = unique("gone")
    await cluster.add_namespace(ns)
    await add_pods(cluster, ns, "kept", "deleted-while-away", "changed-while-away")
    sink = RecordingSink()

    async with reflecting(cluster, api, sink):
        with cluster.proxy.down():
            await cluster.delete_pod(ns, "deleted-while-away")
            await cluster.set_pod(ns, "changed-while-away", annotations={ROLE: "changed"})
            await add_pods(cluster, ns, "added-while-away")
            await cluster.forget_watch_history()  # resuming must now answer 410 Gone

        await eventually(lambda: sink.relists_ended >= 2, cluster.patience)
        assert mine(sink, ns) == {
            f"{ns}/kept",
            f"{ns}/changed-while-away",
            f"{ns}/added-while-away",
        }
        changed = sink.objects[f"{ns}/changed-while-away"]["metadata"]["annotations"]
        assert changed[ROLE] == "changed"
        assert f"{ns}/deleted-while-away" in sink.deleted

        # And it goes on watching from the new list.
        await add_pods(cluster, ns, "after-relist")
        await eventually(lambda: f"{ns}/after-relist" in sink.objects, cluster.patience)


async def test_pod_that_finishes_leaves_an_active_pods_watch_as_deleted(
    cluster: Cluster, api: ApiClient
):
    ns = unique("finish")
    await cluster.add_namespace(ns)
    await add_pods(cluster, ns, "running", "finishing")
    await add_pods(cluster, ns, "already-done", phase="Succeeded")
    sink = RecordingSink()

    async with reflecting(cluster, api, sink, field_selector=UNFINISHED_PODS):
        assert mine(sink, ns) == {f"{ns}/running", f"{ns}/finishing"}

        await cluster.set_pod(ns, "finishing", phase="Succeeded")
        await eventually(lambda: f"{ns}/finishing" in sink.deleted, cluster.patience)

    assert mine(sink, ns) == {f"{ns}/running"}
    assert sink.relists_begun == 1


# --- the server on top ------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module")
async def podiam(cluster: Cluster, moto_sts, tls_dirs):
    async with podiam_server(cluster.kubeconfig, moto_sts, tls_dirs) as server:
        yield server


@pytest_asyncio.fixture(scope="module")
async def stub(podiam):
    async with podiam.channel() as channel:
        yield podiam.stub(channel)


async def permitting(cluster: Cluster, podiam, namespace: str, permitted: str) -> None:
    """A namespace with ``permitted``, once the server knows it. Pod and namespace watches are
    independent streams: a pod's event may otherwise reach the server first, and the pod be
    refused for a namespace it has not seen yet."""
    await cluster.add_namespace(namespace, annotations={PERMITTED: permitted})
    await eventually(lambda: namespace in podiam.server.registry.namespaces, cluster.patience)


async def indexed(podiam, ip: str, name: str, patience: float) -> None:
    def found() -> bool:
        pod = podiam.server.registry.lookup(ip).pod
        return pod is not None and pod.name == name

    await eventually(found, patience)


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    return error.value


async def test_permitted_pod_gets_credentials_for_its_role(cluster: Cluster, podiam, stub):
    ns = unique("apps")
    await permitting(cluster, podiam, ns, "app-.*")
    ip = next_ip()
    await cluster.add_pod(ns, "web", ip=ip, annotations={ROLE: "app-web"})
    await indexed(podiam, ip, "web", cluster.patience)

    role = await stub.GetPodRole(kiam_pb2.GetPodRoleRequest(ip=ip))
    creds = await stub.GetPodCredentials(kiam_pb2.GetPodCredentialsRequest(ip=ip, role="app-web"))

    assert role.name == "app-web"
    assert creds.code == "Success" and creds.access_key_id


async def test_ip_reused_in_another_namespace_never_serves_the_old_pods_role(
    cluster: Cluster, podiam, stub
):
    old_ns, new_ns = unique("old"), unique("new")
    await permitting(cluster, podiam, old_ns, "app-.*")
    await permitting(cluster, podiam, new_ns, "other-.*")
    ip = next_ip()
    await cluster.add_pod(old_ns, "old-owner", ip=ip, annotations={ROLE: "app-old"})
    await indexed(podiam, ip, "old-owner", cluster.patience)
    old = await stub.GetPodCredentials(kiam_pb2.GetPodCredentialsRequest(ip=ip, role="app-old"))

    await cluster.delete_pod(old_ns, "old-owner")
    await cluster.add_pod(new_ns, "new-owner", ip=ip, annotations={ROLE: "other-new"})
    await indexed(podiam, ip, "new-owner", cluster.patience)

    error = await refused(
        stub.GetPodCredentials(kiam_pb2.GetPodCredentialsRequest(ip=ip, role="app-old"))
    )
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert (await stub.GetPodRole(kiam_pb2.GetPodRoleRequest(ip=ip))).name == "other-new"
    new = await stub.GetPodCredentials(kiam_pb2.GetPodCredentialsRequest(ip=ip, role="other-new"))
    assert new.access_key_id != old.access_key_id


async def test_denial_leaves_one_warning_event_on_the_pod(cluster: Cluster, podiam, stub):
    ns = unique("denied")
    await permitting(cluster, podiam, ns, "app-.*")
    ip = next_ip()
    await cluster.add_pod(ns, "greedy", ip=ip, annotations={ROLE: "admin"})
    await indexed(podiam, ip, "greedy", cluster.patience)

    for _ in range(3):
        error = await refused(
            stub.GetPodCredentials(kiam_pb2.GetPodCredentialsRequest(ip=ip, role="admin"))
        )
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    await podiam.server.recorder.drain()

    events = [e for e in await cluster.events(ns) if e["reason"] == "PodiamNotPermitted"]
    assert [
        (e["involvedObject"]["kind"], e["involvedObject"]["name"], e["type"]) for e in events
    ] == [("Pod", "greedy", "Warning")]
    assert "admin" in events[0]["message"]
