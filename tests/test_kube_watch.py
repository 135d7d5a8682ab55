"""The server's Kubernetes watch layer keeps an exact copy of pods and namespaces.

Every test runs the real kubernetes_asyncio client against the test API server and checks what
reached the sink — including across dropped connections, 410 Gone and bookmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from kubernetes_asyncio.client import ApiClient
from prometheus_client import REGISTRY

from server.arn import RoleResolver
from server.kubeconfig import KubeConfigError, check_api_reachable, load_api_client
from server.pods import UNFINISHED_PODS
from server.reflector import Reflector
from server.registry import Registry
from tests.support.kubeapi import KubeApiServer
from tests.support.objects import namespace_object
from tests.support.waiting import eventually


class RecordingSink:
    """Objects by namespace/name, as the server's index keeps them, plus what happened."""

    def __init__(self, on_upsert: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.relists_begun = 0
        self.relists_ended = 0
        self.deleted: list[str] = []
        self._on_upsert = on_upsert
        self._seen: set[str] | None = None

    def begin_relist(self) -> None:
        self.relists_begun += 1
        self._seen = set()

    def upsert(self, obj: dict[str, Any]) -> None:
        if self._on_upsert:
            self._on_upsert(obj)
        key = key_of(obj)
        self.objects[key] = obj
        if self._seen is not None:
            self._seen.add(key)

    def delete(self, obj: dict[str, Any]) -> None:
        key = key_of(obj)
        self.deleted.append(key)
        self.objects.pop(key, None)

    def end_relist(self) -> None:
        seen, self._seen = self._seen or set(), None
        for key in set(self.objects) - seen:
            self.delete(self.objects[key])
        self.relists_ended += 1

    def names(self) -> set[str]:
        return set(self.objects)

    def phase(self, key: str) -> str | None:
        obj = self.objects.get(key)
        return obj["status"].get("phase") if obj else None


def key_of(obj: dict[str, Any]) -> str:
    metadata = obj["metadata"]
    namespace = metadata.get("namespace")
    return f"{namespace}/{metadata['name']}" if namespace else metadata["name"]


def add_pods(kube: KubeApiServer, *names: str, phase: str = "Running") -> None:
    for name in names:
        number = len(kube.store.objects["pods"]) + 1
        kube.add_pod("default", name, ip=f"10.0.{number >> 8}.{number & 255}", phase=phase)


@pytest.fixture(name="kube")
def kube_of_its_own(fresh_kube: KubeApiServer) -> KubeApiServer:
    """These tests change the API server itself (compaction, watches, request counts): each
    test gets a new one."""
    return fresh_kube


@pytest_asyncio.fixture
async def api(kube: KubeApiServer, tmp_path: Path) -> AsyncIterator[ApiClient]:
    path = tmp_path / "kubeconfig"
    kube.write_kubeconfig(str(path))
    client = await load_api_client(str(path))
    yield client
    await client.close()


@contextlib.asynccontextmanager
async def reflecting(
    kube: KubeApiServer,
    api: ApiClient,
    sink: RecordingSink,
    *,
    resource: str = "pods",
    **options: Any,
) -> AsyncIterator[Reflector]:
    """Run a reflector until the block ends; enter once its first list is complete and its
    watch is open (the list ends before the watch starts: a test that dropped or bookmarked
    watches in between would act on none)."""
    reflector = Reflector(api, resource=resource, sink=sink, **options)
    task = asyncio.create_task(reflector.run())
    try:
        await eventually(
            lambda: (reflector.synced.is_set() and kube.watching(resource)) or task.done()
        )
        if task.done():
            task.result()  # raises whatever killed it
        yield reflector
        assert not task.done(), "the reflector stopped on its own"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --- listing ----------------------------------------------------------------------------------


async def test_paged_list_reaches_exactly_every_pod(kube: KubeApiServer, api: ApiClient):
    kube.add_pods(
        {"namespace": f"ns{i % 7}", "name": f"pod-{i}", "ip": f"10.1.{i >> 8}.{i & 255}"}
        for i in range(1234)
    )
    sink = RecordingSink()

    async with reflecting(kube, api, sink, page_size=100):
        pass

    assert sink.names() == {f"ns{i % 7}/pod-{i}" for i in range(1234)}
    assert kube.list_requests["pods"] == 1
    assert kube.list_pages["pods"] == 13


async def test_namespaces_are_reflected_with_their_annotations(kube: KubeApiServer, api: ApiClient):
    kube.add_namespace("team-a", annotations={"iam.amazonaws.com/permitted": "team-a-.*"})
    sink = RecordingSink()

    async with reflecting(kube, api, sink, resource="namespaces"):
        kube.update_namespace("team-a", annotations={"iam.amazonaws.com/permitted": ".*"})
        kube.delete_namespace("default")
        await eventually(lambda: sink.names() == {"team-a"})
        await eventually(
            lambda: (
                sink.objects["team-a"]["metadata"]["annotations"]
                == {"iam.amazonaws.com/permitted": ".*"}
            )
        )


async def test_expired_continue_token_restarts_the_list_from_scratch(
    kube: KubeApiServer, api: ApiClient
):
    add_pods(kube, *(f"p{i:02}" for i in range(30)))
    compacted = False

    def compact_during_first_page(obj: dict[str, Any]) -> None:
        nonlocal compacted
        if not compacted:
            compacted = True
            # Between pages: the snapshot the continue token refers to is compacted away,
            # and a pod the first page already delivered is deleted.
            kube.delete_pod("default", "p00")
            kube.compact()

    sink = RecordingSink(on_upsert=compact_during_first_page)
    async with reflecting(kube, api, sink, page_size=10):
        pass

    assert sink.names() == {f"default/p{i:02}" for i in range(1, 30)}
    assert kube.list_requests["pods"] == 2
    assert sink.relists_begun == 2 and sink.relists_ended == 1


# --- watching ---------------------------------------------------------------------------------


async def test_added_modified_and_deleted_pods_reach_the_sink(kube: KubeApiServer, api: ApiClient):
    add_pods(kube, "stays", "goes")
    sink = RecordingSink()

    async with reflecting(kube, api, sink):
        add_pods(kube, "new")
        kube.update_pod("default", "stays", annotations={"iam.amazonaws.com/role": "reader"})
        kube.delete_pod("default", "goes")

        await eventually(lambda: sink.names() == {"default/stays", "default/new"})
        await eventually(
            lambda: (
                sink.objects["default/stays"]["metadata"].get("annotations")
                == {"iam.amazonaws.com/role": "reader"}
            )
        )
    assert sink.deleted == ["default/goes"]


def watch_events(kind: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "podiam_kube_watch_events_total", {"resource": "pods", "type": kind}
        )
        or 0.0
    )


async def test_every_watch_event_is_counted_by_type_when_they_arrive_together(
    kube: KubeApiServer, api: ApiClient
):
    add_pods(kube, "old-0", "old-1")
    sink = RecordingSink()
    async with reflecting(kube, api, sink):
        added, deleted = watch_events("ADDED"), watch_events("DELETED")
        add_pods(kube, *(f"burst-{n}" for n in range(20)))  # one write: a batch of 20 lines
        kube.delete_pod("default", "old-0")
        await eventually(lambda: "default/burst-19" in sink.names() and sink.deleted)
        await eventually(lambda: watch_events("ADDED") == added + 20)
        assert watch_events("DELETED") == deleted + 1


async def test_dropped_watch_resumes_from_last_version_without_relisting(
    kube: KubeApiServer, api: ApiClient
):
    add_pods(kube, "a", "b", "c")
    sink = RecordingSink()

    async with reflecting(kube, api, sink):
        kube.drop_watches()
        # While the watch is down:
        add_pods(kube, "d")
        kube.update_pod("default", "a", phase="Succeeded")
        kube.delete_pod("default", "b")

        await eventually(lambda: sink.names() == {"default/a", "default/c", "default/d"})
        await eventually(lambda: sink.phase("default/a") == "Succeeded")
        assert kube.watch_requests["pods"] >= 2

    assert kube.list_requests["pods"] == 1
    assert sink.relists_begun == 1


async def test_watch_that_times_out_is_resumed_without_relisting(
    kube: KubeApiServer, api: ApiClient
):
    sink = RecordingSink()

    async with reflecting(kube, api, sink, watch_timeout=1):
        await eventually(lambda: kube.watch_requests["pods"] >= 2, timeout=5)
        add_pods(kube, "after-timeout")
        await eventually(lambda: "default/after-timeout" in sink.objects)

    assert kube.list_requests["pods"] == 1


async def test_deletions_missed_during_410_are_applied_after_relist(
    kube: KubeApiServer, api: ApiClient
):
    add_pods(kube, "kept", "deleted-while-away", "changed-while-away")
    sink = RecordingSink()

    async with reflecting(kube, api, sink, backoff_max=0.2) as reflector:
        kube.drop_watches()
        kube.delete_pod("default", "deleted-while-away")
        kube.update_pod("default", "changed-while-away", ip="10.9.9.9")
        add_pods(kube, "added-while-away")
        kube.compact()  # the history of those changes is gone: resuming must 410

        await eventually(lambda: sink.relists_ended == 2)
        assert sink.names() == {
            "default/kept",
            "default/changed-while-away",
            "default/added-while-away",
        }
        assert sink.objects["default/changed-while-away"]["status"]["podIP"] == "10.9.9.9"
        assert "default/deleted-while-away" in sink.deleted

        # And it goes on watching from the new list.
        add_pods(kube, "after-relist")
        await eventually(lambda: "default/after-relist" in sink.objects)
        assert reflector.resource_version == str(kube.store.rv)


async def test_expired_watch_relists_and_keeps_the_index_exact(kube: KubeApiServer, api: ApiClient):
    add_pods(kube, "a", "b")
    sink = RecordingSink()

    async with reflecting(kube, api, sink):
        kube.delete_pod("default", "a")
        kube.compact()
        kube.expire_watches()

        await eventually(lambda: kube.list_requests["pods"] == 2)
        await eventually(lambda: sink.relists_ended == 2)
        assert sink.names() == {"default/b"}


async def test_bookmark_advances_version_so_resume_after_compaction_needs_no_relist(
    kube: KubeApiServer, api: ApiClient
):
    add_pods(kube, "a")
    sink = RecordingSink()

    async with reflecting(kube, api, sink) as reflector:
        kube.add_namespace("unrelated")  # moves the global version past every pod event
        kube.send_bookmarks()
        await eventually(lambda: reflector.resource_version == str(kube.store.rv))

        kube.compact()
        kube.drop_watches()
        add_pods(kube, "b")
        await eventually(lambda: "default/b" in sink.objects)

    assert kube.list_requests["pods"] == 1


async def test_without_a_bookmark_the_same_compaction_forces_a_relist(
    kube: KubeApiServer, api: ApiClient
):
    add_pods(kube, "a")
    sink = RecordingSink()

    async with reflecting(kube, api, sink):
        kube.add_namespace("unrelated")
        kube.compact()
        kube.drop_watches()
        add_pods(kube, "b")
        await eventually(lambda: "default/b" in sink.objects)

    assert kube.list_requests["pods"] == 2


async def test_pod_that_finishes_leaves_an_active_pods_watch_as_deleted(
    kube: KubeApiServer, api: ApiClient
):
    add_pods(kube, "running", "finishing")
    add_pods(kube, "already-done", phase="Succeeded")
    sink = RecordingSink()

    async with reflecting(kube, api, sink, field_selector=UNFINISHED_PODS):
        assert sink.names() == {"default/running", "default/finishing"}

        kube.update_pod("default", "finishing", phase="Succeeded")
        await eventually(lambda: sink.deleted == ["default/finishing"])

    assert sink.names() == {"default/running"}
    assert sink.relists_begun == 1


async def test_pod_with_huge_annotations_arrives_whole(kube: KubeApiServer, api: ApiClient):
    # Larger than aiohttp's line limit for this client (2 * 2 MiB read buffer).
    huge = "x" * (5 * 2**20)
    sink = RecordingSink()

    async with reflecting(kube, api, sink):
        kube.add_pod("default", "big", ip="10.0.0.1", annotations={"note": huge})
        add_pods(kube, "after-big")
        await eventually(lambda: "default/after-big" in sink.objects)

    assert sink.objects["default/big"]["metadata"]["annotations"]["note"] == huge


async def test_object_the_sink_rejects_is_skipped_and_watching_goes_on(
    kube: KubeApiServer, api: ApiClient
):
    def reject_poison(obj: dict[str, Any]) -> None:
        if obj["metadata"]["name"] == "poison":
            raise ValueError("cannot index this pod")

    sink = RecordingSink(on_upsert=reject_poison)

    async with reflecting(kube, api, sink):
        add_pods(kube, "poison", "healthy")
        await eventually(lambda: "default/healthy" in sink.objects)

    assert "default/poison" not in sink.objects
    assert kube.list_requests["pods"] == 1


async def test_reflector_rides_out_an_api_server_restart(kube: KubeApiServer, api: ApiClient):
    add_pods(kube, "a")
    sink = RecordingSink()

    async with reflecting(kube, api, sink, backoff_max=0.2):
        failures = watch_failures()
        await kube.stop()
        add_pods(kube, "added-while-down")  # the store, like etcd, survives the restart
        await eventually(lambda: watch_failures() >= failures + 2)  # refused, retried
        await kube.start()  # same port

        await eventually(lambda: "default/added-while-down" in sink.objects)

    assert kube.list_requests["pods"] == 1


def watch_failures() -> float:
    value = REGISTRY.get_sample_value(
        "podiam_kube_watch_restarts_total", {"resource": "pods", "reason": "error"}
    )
    return value or 0.0


# --- configuration ----------------------------------------------------------------------------


async def test_missing_kubeconfig_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "absent"

    with pytest.raises(KubeConfigError, match=f"kubeconfig {path}: No such file"):
        await load_api_client(str(path))


async def test_garbage_kubeconfig_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "garbage"
    path.write_text("this: is: not: [a kubeconfig\n")

    with pytest.raises(KubeConfigError, match=f"kubeconfig {path}: "):
        await load_api_client(str(path))


async def test_kubeconfig_without_clusters_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "empty"
    path.write_text("apiVersion: v1\nkind: Config\ncurrent-context: nothing\n")

    with pytest.raises(KubeConfigError, match=f"kubeconfig {path}: "):
        await load_api_client(str(path))


async def test_reachable_api_passes_the_check(api: ApiClient):
    await check_api_reachable(api, timeout=5)


async def test_unreachable_api_is_a_clear_error(tmp_path: Path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with KubeApiServer(port=port) as kube:
        path = tmp_path / "kubeconfig"
        kube.write_kubeconfig(str(path))
    api = await load_api_client(str(path))
    try:
        with pytest.raises(KubeConfigError, match=f"API at http://127.0.0.1:{port} unreachable"):
            await check_api_reachable(api, timeout=5)
    finally:
        await api.close()


# --- decoding straight into the registry's records -------------------------------------------


def registry_with_namespace() -> Registry:
    registry = Registry(
        resolver=RoleResolver("arn:aws:iam::123456789012:role/"),
        session_name=lambda pod: f"podiam-{pod.name}",
        credentials=NoCredentials(),
    )
    registry.namespace_sink.upsert(namespace_object("default", ".*"))
    return registry


class NoCredentials:
    def acquire(self, identity) -> None:
        pass

    def release(self, identity) -> None:
        pass


async def test_pod_with_an_unreadable_annotation_is_refused_alone_in_its_list_page(
    kube: KubeApiServer, api: ApiClient
):
    # An annotation value that is not a string does not fit the pod's wire struct: that one
    # pod is refused (logged), the others of its page are indexed, the list is not retried.
    add_pods(kube, "before")
    kube.add_pod("default", "poison", ip="10.0.9.9", annotations={"iam.amazonaws.com/role": 5})
    add_pods(kube, "after")
    registry = registry_with_namespace()

    reflector = Reflector(api, resource="pods", sink=registry.pod_sink, page_size=500)
    task = asyncio.create_task(reflector.run())
    try:
        await eventually(lambda: reflector.synced.is_set())
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    assert set(registry.pods) == {("default", "before"), ("default", "after")}
    assert kube.list_requests["pods"] == 1


async def test_watched_pod_with_an_unreadable_annotation_is_skipped_and_watching_goes_on(
    kube: KubeApiServer, api: ApiClient
):
    registry = registry_with_namespace()
    reflector = Reflector(api, resource="pods", sink=registry.pod_sink)
    task = asyncio.create_task(reflector.run())
    try:
        await eventually(lambda: reflector.synced.is_set() and kube.watching("pods"))
        kube.add_pod("default", "poison", ip="10.0.9.9", annotations={"iam.amazonaws.com/role": 5})
        kube.add_pod(
            "default", "healthy", ip="10.0.9.10", annotations={"iam.amazonaws.com/role": "app"}
        )
        await eventually(lambda: ("default", "healthy") in registry.pods)
        assert reflector.resource_version == str(kube.store.rv)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    assert ("default", "poison") not in registry.pods
    assert registry.lookup("10.0.9.10").grant.role_arn == "arn:aws:iam::123456789012:role/app"
    assert kube.list_requests["pods"] == 1
