"""The Kubernetes API test server speaks the protocol the real kubernetes_asyncio client expects.

Other tests trust it to behave like a real API server; these pin the behaviours they rely on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from kubernetes_asyncio import config, watch
from kubernetes_asyncio.client import ApiClient, Configuration, CoreV1Api, VersionApi
from kubernetes_asyncio.client.exceptions import ApiException

from server.pods import UNFINISHED_PODS, pod_from_object
from tests.support.kubeapi import KubeApiServer


@pytest.fixture(name="kube")
def kube_of_its_own(fresh_kube: KubeApiServer) -> KubeApiServer:
    """These tests change the API server itself (compaction, watches, request counts): each
    test gets a new one."""
    return fresh_kube


@contextlib.asynccontextmanager
async def client_of(kube: KubeApiServer, directory: Path) -> AsyncIterator[CoreV1Api]:
    """A real client configured the way the server is: from the kubeconfig kube writes."""
    path = str(directory / f"kubeconfig-{kube.port}")
    kube.write_kubeconfig(path)
    configuration = Configuration()
    await config.load_kube_config(config_file=path, client_configuration=configuration)
    async with ApiClient(configuration) as api:
        yield CoreV1Api(api)


@pytest_asyncio.fixture
async def core(kube: KubeApiServer, tmp_path: Path) -> AsyncIterator[CoreV1Api]:
    async with client_of(kube, tmp_path) as client:
        yield client


async def raw_list(core: CoreV1Api, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    response = await core.list_pod_for_all_namespaces(_preload_content=False, **kwargs)
    async with response:
        return response.status, json.loads(await response.read())


async def watch_lines(core: CoreV1Api, count: int, **kwargs: Any) -> list[dict[str, Any]]:
    """The first ``count`` events of a pod watch, as raw dictionaries."""
    response = await core.list_pod_for_all_namespaces(watch=True, _preload_content=False, **kwargs)
    try:
        return [json.loads(await response.content.readline()) for _ in range(count)]
    finally:
        response.close()


async def test_client_reads_pods_and_namespaces_as_models(kube: KubeApiServer, core: CoreV1Api):
    kube.add_pod("default", "web", ip="10.0.0.5", host_ip="192.168.1.1", annotations={"a": "b"})

    pods = await core.list_namespaced_pod("default")
    pod = await core.read_namespaced_pod("web", "default")
    namespace = await core.read_namespace("default")
    version = await VersionApi(core.api_client).get_code()

    assert [p.metadata.name for p in pods.items] == ["web"]
    assert pod.status.pod_ip == "10.0.0.5"
    assert pod.status.host_ip == "192.168.1.1"
    assert pod.metadata.annotations == {"a": "b"}
    assert pod.metadata.uid and pod.metadata.creation_timestamp
    assert namespace.status.phase == "Active"
    assert version.major == "1"


async def test_list_items_have_no_kind_but_the_list_does(kube: KubeApiServer, core: CoreV1Api):
    kube.add_pod("default", "web", ip="10.0.0.5", host_ip="192.168.1.1")

    status, body = await raw_list(core)

    assert status == 200
    assert (body["kind"], body["apiVersion"]) == ("PodList", "v1")
    assert body["metadata"]["resourceVersion"] == str(kube.store.rv)
    assert "kind" not in body["items"][0]


async def test_resource_versions_are_global_across_kinds(kube: KubeApiServer):
    pod = kube.add_pod("default", "a", ip="10.0.0.1", host_ip="192.168.1.1")
    namespace = kube.add_namespace("other")
    updated = kube.update_pod("default", "a", phase="Succeeded")

    versions = [int(o["metadata"]["resourceVersion"]) for o in (pod, namespace, updated)]
    assert versions == sorted(versions) and len(set(versions)) == 3
    assert updated["metadata"]["uid"] == pod["metadata"]["uid"]


async def test_paged_list_is_a_consistent_snapshot(kube: KubeApiServer, core: CoreV1Api):
    for i in range(5):
        kube.add_pod("default", f"p{i}", ip=f"10.0.0.{i}", host_ip="192.168.1.1")

    _, first = await raw_list(core, limit=2)
    kube.delete_pod("default", "p4")
    kube.add_pod("default", "p5", ip="10.0.0.9", host_ip="192.168.1.1")
    _, second = await raw_list(core, limit=2, _continue=first["metadata"]["continue"])
    _, third = await raw_list(core, limit=2, _continue=second["metadata"]["continue"])

    names = [p["metadata"]["name"] for page in (first, second, third) for p in page["items"]]
    assert names == ["p0", "p1", "p2", "p3", "p4"]
    assert "continue" not in third["metadata"]
    assert third["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
    assert kube.list_requests["pods"] == 1 and kube.list_pages["pods"] == 3


async def test_continue_token_expires_with_compaction(kube: KubeApiServer, core: CoreV1Api):
    for i in range(3):
        kube.add_pod("default", f"p{i}", ip=f"10.0.0.{i}", host_ip="192.168.1.1")
    _, first = await raw_list(core, limit=1)

    kube.compact()
    status, body = await raw_list(core, limit=1, _continue=first["metadata"]["continue"])

    assert status == 410
    assert (body["kind"], body["reason"], body["code"]) == ("Status", "Expired", 410)


async def test_field_selectors_filter_lists(kube: KubeApiServer, core: CoreV1Api):
    kube.add_pod("default", "a", ip="10.0.0.1", host_ip="192.168.1.1", node_name="n1")
    kube.add_pod("default", "b", ip="10.0.0.2", host_ip="192.168.1.2", node_name="n2")
    kube.add_pod("default", "c", ip="10.0.0.3", host_ip="192.168.1.1", node_name="n1")
    kube.update_pod("default", "c", phase="Failed")

    pods = await core.list_pod_for_all_namespaces(
        field_selector="spec.nodeName=n1,status.phase!=Failed"
    )

    assert [p.metadata.name for p in pods.items] == ["a"]


async def test_unsupported_field_selector_is_a_bad_request(core: CoreV1Api):
    with pytest.raises(ApiException) as raised:
        await core.list_pod_for_all_namespaces(field_selector="spec.containers=x")
    assert raised.value.status == 400


async def test_watch_helper_of_the_client_receives_changes(kube: KubeApiServer, core: CoreV1Api):
    start = kube.store.rv
    kube.add_pod("default", "a", ip="10.0.0.1", host_ip="192.168.1.1")
    kube.update_pod("default", "a", annotations={"iam.amazonaws.com/role": "r"})
    kube.delete_pod("default", "a")

    seen = []
    async with watch.Watch().stream(
        core.list_namespaced_pod, "default", resource_version=str(start), timeout_seconds=1
    ) as stream:
        async for event in stream:
            seen.append((event["type"], event["object"].metadata.name))

    assert seen == [("ADDED", "a"), ("MODIFIED", "a"), ("DELETED", "a")]


async def test_watch_without_version_starts_with_current_state(
    kube: KubeApiServer, core: CoreV1Api
):
    kube.add_pod("default", "a", ip="10.0.0.1", host_ip="192.168.1.1")

    events = await watch_lines(core, 1, timeout_seconds=5)

    assert events[0]["type"] == "ADDED"
    assert events[0]["object"]["kind"] == "Pod"


async def test_watch_from_compacted_version_gets_410_error_event(
    kube: KubeApiServer, core: CoreV1Api
):
    old = kube.store.rv
    kube.add_pod("default", "a", ip="10.0.0.1", host_ip="192.168.1.1")
    kube.compact()

    [event] = await watch_lines(core, 1, resource_version=str(old))

    assert event["type"] == "ERROR"
    assert event["object"]["code"] == 410
    assert event["object"]["reason"] == "Expired"


async def test_pod_leaving_the_field_selector_is_deleted_for_the_watch(
    kube: KubeApiServer, core: CoreV1Api
):
    start = kube.store.rv
    kube.add_pod("default", "a", ip="10.0.0.1", host_ip="192.168.1.1", phase="Pending")
    kube.update_pod("default", "a", phase="Running")
    kube.update_pod("default", "a", phase="Succeeded")
    kube.add_pod("default", "b", ip="10.0.0.2", host_ip="192.168.1.1", phase="Failed")
    kube.add_pod("default", "c", ip="10.0.0.3", host_ip="192.168.1.1", phase="Running")

    events = await watch_lines(
        core, 3, resource_version=str(start), field_selector="status.phase=Running"
    )

    seen = [
        (e["type"], e["object"]["metadata"]["name"], e["object"]["status"]["phase"]) for e in events
    ]
    assert seen == [
        ("ADDED", "a", "Running"),  # Pending did not match: its first match is an ADDED
        ("DELETED", "a", "Succeeded"),  # it stopped matching: gone, as far as the watch sees
        ("ADDED", "c", "Running"),  # b never matched, so it never appeared
    ]


async def test_bookmarks_carry_the_current_version(kube: KubeApiServer, core: CoreV1Api):
    response = await core.list_pod_for_all_namespaces(
        watch=True,
        allow_watch_bookmarks=True,
        resource_version=str(kube.store.rv),
        _preload_content=False,
    )
    try:
        kube.add_namespace("other")  # advances the version without any pod event
        kube.send_bookmarks()
        event = json.loads(await response.content.readline())
    finally:
        response.close()

    assert event["type"] == "BOOKMARK"
    assert event["object"]["metadata"]["resourceVersion"] == str(kube.store.rv)


async def test_periodic_bookmarks_are_sent(tmp_path: Path):
    async with KubeApiServer(bookmark_interval=0.05) as kube, client_of(kube, tmp_path) as core:
        events = await watch_lines(
            core, 2, allow_watch_bookmarks=True, resource_version="0", timeout_seconds=5
        )
    assert [e["type"] for e in events] == ["BOOKMARK", "BOOKMARK"]


async def test_no_bookmarks_unless_asked_for(kube: KubeApiServer, core: CoreV1Api):
    response = await core.list_pod_for_all_namespaces(
        watch=True, resource_version=str(kube.store.rv), _preload_content=False
    )
    try:
        kube.send_bookmarks()
        kube.add_pod("default", "a", ip="10.0.0.1", host_ip="192.168.1.1")
        event = json.loads(await response.content.readline())
    finally:
        response.close()
    assert event["type"] == "ADDED"


async def test_watch_ends_after_timeout_seconds(kube: KubeApiServer, core: CoreV1Api):
    response = await core.list_pod_for_all_namespaces(
        watch=True, timeout_seconds=1, resource_version=str(kube.store.rv), _preload_content=False
    )
    async with asyncio.timeout(3):
        body = await response.read()
    assert body == b""


async def test_dropped_watch_breaks_the_connection(kube: KubeApiServer, core: CoreV1Api):
    response = await core.list_pod_for_all_namespaces(
        watch=True, resource_version=str(kube.store.rv), _preload_content=False
    )
    kube.drop_watches()

    with pytest.raises(aiohttp.ClientPayloadError):
        async with asyncio.timeout(3):
            await response.read()


async def test_stop_closes_open_watches_promptly(tmp_path: Path):
    kube = KubeApiServer()
    await kube.start()
    async with client_of(kube, tmp_path) as core:
        response = await core.list_pod_for_all_namespaces(watch=True, _preload_content=False)

        async with asyncio.timeout(3):
            await kube.stop()
            await response.read()


async def test_events_are_created_and_patched_through_the_client(
    kube: KubeApiServer, core: CoreV1Api
):
    body = {
        "metadata": {"generateName": "web.", "namespace": "default"},
        "involvedObject": {"kind": "Pod", "namespace": "default", "name": "web"},
        "reason": "RoleDenied",
        "message": "role r not permitted",
        "type": "Warning",
        "count": 1,
    }

    created = await core.create_namespaced_event("default", body)
    await core.patch_namespaced_event(
        created.metadata.name, "default", {"count": 2, "message": "again"}
    )
    listed = await core.list_namespaced_event("default")

    [event] = kube.events
    assert created.metadata.name.startswith("web.")
    assert (event["count"], event["message"], event["reason"]) == (2, "again", "RoleDenied")
    assert [e.count for e in listed.items] == [2]


async def test_json_patch_is_unsupported(kube: KubeApiServer, core: CoreV1Api):
    created = await core.create_namespaced_event(
        "default", {"metadata": {"name": "e1"}, "involvedObject": {}, "reason": "R"}
    )
    with pytest.raises(ApiException) as raised:
        await core.patch_namespaced_event(
            created.metadata.name, "default", [{"op": "replace", "path": "/count", "value": 3}]
        )
    assert raised.value.status == 415


async def test_event_in_missing_namespace_is_not_found(core: CoreV1Api):
    with pytest.raises(ApiException) as raised:
        await core.create_namespaced_event(
            "nowhere", {"metadata": {"name": "e1"}, "involvedObject": {}}
        )
    assert raised.value.status == 404


async def test_wrong_token_is_unauthorized(kube: KubeApiServer, core: CoreV1Api):
    core.api_client.configuration.api_key["BearerToken"] = "Bearer wrong"
    with pytest.raises(ApiException) as raised:
        await core.list_namespace()
    assert raised.value.status == 401


async def test_bulk_load_of_100000_pods_is_fast(kube: KubeApiServer, core: CoreV1Api):
    loop = asyncio.get_running_loop()
    started = loop.time()
    added = kube.add_pods(
        {"namespace": "default", "name": f"p{i:06}", "ip": f"10.{i >> 16}.{i >> 8 & 255}.{i & 255}"}
        for i in range(100_000)
    )
    elapsed = loop.time() - started

    _, page = await raw_list(core, limit=10)
    assert added == 100_000
    assert elapsed < 10
    assert [p["metadata"]["name"] for p in page["items"]][:2] == ["p000000", "p000001"]


def test_runs_standalone_and_prints_its_url():
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.kubeapi", "--port", "0"],
        cwd=Path(__file__).parent.parent,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{url}/api/v1/namespaces", timeout=10) as answer:
            namespaces = json.load(answer)
        assert [n["metadata"]["name"] for n in namespaces["items"]] == ["default"]
    finally:
        process.terminate()
        process.wait(timeout=10)


# ---- nodes: read and patched as the real API server does

STARTUP = {"key": "podiam.io/agent-not-ready", "value": "true", "effect": "NoExecute"}
OTHER = {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}


async def patch_node(core: CoreV1Api, name: str, body: Any, content_type: str):
    response = await core.patch_node(name, body, _content_type=content_type, _preload_content=False)
    async with response:
        return response.status, json.loads(await response.read())


async def test_node_is_read_with_its_taints_and_addresses(kube: KubeApiServer, core: CoreV1Api):
    kube.add_node("n1", internal_ip="10.0.0.5", taints=[STARTUP, OTHER])
    node = await core.read_node("n1")
    assert [t.key for t in node.spec.taints] == [STARTUP["key"], OTHER["key"]]
    assert {"type": "InternalIP", "address": "10.0.0.5"} in [
        a.to_dict() for a in node.status.addresses
    ]


async def test_missing_node_is_not_found(core: CoreV1Api):
    with pytest.raises(ApiException) as error:
        await core.read_node("nowhere")
    assert error.value.status == 404
    status, body = await patch_node(core, "nowhere", [], "application/json-patch+json")
    assert (status, body["reason"]) == (404, "NotFound")


async def test_json_patch_with_passing_test_applies_and_bumps_the_version(
    kube: KubeApiServer, core: CoreV1Api
):
    before = kube.add_node("n2", taints=[STARTUP, OTHER])
    patch = [
        {"op": "test", "path": "/spec/taints", "value": [STARTUP, OTHER]},
        {"op": "replace", "path": "/spec/taints", "value": [OTHER]},
    ]
    status, node = await patch_node(core, "n2", patch, "application/json-patch+json")
    assert status == 200 and node["kind"] == "Node"
    assert node["spec"]["taints"] == [OTHER] == kube.taints("n2")
    assert int(node["metadata"]["resourceVersion"]) > int(before["metadata"]["resourceVersion"])


async def test_json_patch_whose_test_fails_is_invalid_and_changes_nothing(
    kube: KubeApiServer, core: CoreV1Api
):
    before = kube.add_node("n3", taints=[STARTUP, OTHER])
    patch = [
        {"op": "test", "path": "/spec/taints", "value": [STARTUP]},
        {"op": "remove", "path": "/spec/taints"},
    ]
    status, body = await patch_node(core, "n3", patch, "application/json-patch+json")
    assert (status, body["reason"]) == (422, "Invalid")
    assert kube.node("n3") == before


async def test_malformed_json_patch_is_a_bad_request(kube: KubeApiServer, core: CoreV1Api):
    kube.add_node("n4")
    status, _ = await patch_node(core, "n4", [{"op": "jump"}], "application/json-patch+json")
    assert status == 400


async def test_merge_patch_on_a_node_and_stale_resource_version_conflicts(
    kube: KubeApiServer, core: CoreV1Api
):
    node = kube.add_node("n5", taints=[STARTUP])
    stale = node["metadata"]["resourceVersion"]
    status, patched = await patch_node(
        core, "n5", {"metadata": {"labels": {"a": "b"}}}, "application/merge-patch+json"
    )
    assert status == 200 and patched["metadata"]["labels"]["a"] == "b"
    body = {"metadata": {"resourceVersion": stale}, "spec": {"taints": None}}
    status, answer = await patch_node(core, "n5", body, "application/merge-patch+json")
    assert (status, answer["reason"]) == (409, "Conflict")
    assert kube.taints("n5") == [STARTUP]


async def test_injected_failures_answer_once_each(kube: KubeApiServer, core: CoreV1Api):
    kube.add_node("n6")
    kube.fail_next("GET", "nodes", 503, times=2)
    for _ in range(2):
        with pytest.raises(ApiException) as error:
            await core.read_node("n6")
        assert error.value.status == 503
    assert (await core.read_node("n6")).metadata.name == "n6"


async def test_a_pods_lifecycle_reaches_a_watch_as_the_real_control_plane_writes_it(
    kube: KubeApiServer, core: CoreV1Api
):
    """A Deployment's pod as kube-apiserver, the scheduler and kwok write it (captured for
    bench/server_scale.py): six events through podiam's field selector, of which podiam's
    record of the pod changes on three — created, started, deleted."""
    start = kube.store.rv
    kube.add_pod("default", "web-1", phase="Pending", annotations={"iam.amazonaws.com/role": "app"})
    kube.bind_pod("default", "web-1", "node-1")
    kube.start_pod("default", "web-1", ip="10.0.0.1", host_ip="192.168.1.1")
    kube.mark_pod_deleted("default", "web-1", 30)
    kube.mark_pod_deleted("default", "web-1", 0)
    kube.delete_pod("default", "web-1")

    events = await watch_lines(core, 6, resource_version=str(start), field_selector=UNFINISHED_PODS)

    seen = []
    for event in events:
        pod = event["object"]
        metadata, spec, status = pod["metadata"], pod["spec"], pod["status"]
        seen.append((
            event["type"], spec.get("nodeName"), status["phase"], status.get("podIP"),
            status.get("hostIP"), [c["type"] for c in status.get("conditions", [])],
            metadata.get("deletionGracePeriodSeconds"), "deletionTimestamp" in metadata,
            metadata.get("generation", 1),
        ))  # fmt: skip
    ready = ["Initialized", "ContainersReady", "Ready", "PodScheduled"]
    assert seen == [
        ("ADDED", None, "Pending", None, None, [], None, False, 1),
        ("MODIFIED", "node-1", "Pending", None, None, ["PodScheduled"], None, False, 1),
        ("MODIFIED", "node-1", "Running", "10.0.0.1", "192.168.1.1", ready, None, False, 1),
        ("MODIFIED", "node-1", "Running", "10.0.0.1", "192.168.1.1", ready, 30, True, 2),
        ("MODIFIED", "node-1", "Running", "10.0.0.1", "192.168.1.1", ready, 0, True, 2),
        ("DELETED", "node-1", "Running", "10.0.0.1", "192.168.1.1", ready, 0, True, 2),
    ]
    records = [pod_from_object(event["object"]) for event in events]
    changed = [n for n in range(1, 5) if records[n] != records[n - 1]]
    assert changed == [2]  # of the MODIFIED events, only the start changes what podiam keeps
    assert records[2].active and not records[0].active
