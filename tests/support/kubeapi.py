"""A Kubernetes API server for tests, speaking the real list/watch protocol over plain HTTP.

podiam's server learns about pods and namespaces from the Kubernetes API through the real
kubernetes_asyncio client. To test that without a cluster, this module serves the parts of the
core/v1 API the server uses, faithfully enough that the client cannot tell the difference:

- one global, increasing resourceVersion across all kinds (as etcd's revision);
- paginated lists (``limit``/``continue``) over a consistent snapshot, 410 Gone once the
  snapshot's revision has been compacted away;
- watches replaying history after a resourceVersion, an ``ERROR`` event with a 410 Status when
  that version is too old, bookmarks, ``timeoutSeconds``, and field selectors with their real
  edge semantics (an object that stops matching arrives as DELETED, one that starts as ADDED);
- Events created and patched by the server under test;
- nodes read and patched (JSON patch, merge patch) as the real API server does: every write
  bumps the resourceVersion, a failed JSON-patch ``test`` op or a patch that cannot be applied
  answers 422 Invalid, a malformed patch 400, a stale resourceVersion in the patch 409;
- injected failures (``fail_next``) to show that callers retry.

It is fast enough not to be what a benchmark measures (bench/server_scale.py lists 550,000 pods
from it): each object is encoded to JSON once, when it is written, and a list page is those
bytes joined, not a structure encoded again for every request.

Tests drive it through Python methods (``add_pod``, ``compact``, ``drop_watches``, ...) called
from the same event loop. ``python -m tests.support.kubeapi --port N`` runs one standalone.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import bisect
import copy
import functools
import gc
import itertools
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jsonpatch
import msgspec
import yaml
from aiohttp import web

from tests.support.objects import Object, namespace_object, node_object, pod_object

Key = tuple[str, str]  # (namespace, name); namespace is "" for cluster-scoped objects
# A watch event: type, object, and the object's JSON when it was encoded as stored (else None).
Event = tuple[str, "Object", bytes | None]

KINDS = {"pods": "Pod", "namespaces": "Namespace", "events": "Event", "nodes": "Node"}
NAMESPACED = {"pods", "events"}

# Fields each resource accepts in a fieldSelector, as the real API server does; anything else
# is a 400 "field label not supported".
SELECTABLE_FIELDS = {
    "pods": {
        "metadata.name",
        "metadata.namespace",
        "spec.nodeName",
        "spec.hostNetwork",
        "spec.serviceAccountName",
        "status.phase",
        "status.podIP",
    },
    "namespaces": {"metadata.name", "status.phase"},
    "nodes": {"metadata.name", "spec.unschedulable"},
    "events": {
        "metadata.name",
        "metadata.namespace",
        "involvedObject.kind",
        "involvedObject.name",
        "involvedObject.namespace",
        "involvedObject.uid",
        "reason",
        "type",
    },
}

MERGE_PATCH_TYPES = {"application/merge-patch+json", "application/strategic-merge-patch+json"}
JSON_PATCH_TYPE = "application/json-patch+json"
DEFAULT_TOKEN = "podiam-test-token"


# --------------------------------------------------------------------------------------------
# Errors as the API server reports them: a Status object with the HTTP code.


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message

    def status(self) -> Object:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }

    def response(self) -> web.Response:
        return web.json_response(self.status(), status=self.code)


def too_old(rv: int) -> ApiError:
    return ApiError(410, "Expired", f"too old resource version: {rv}")


# --------------------------------------------------------------------------------------------
# Selectors.


@dataclass(frozen=True, slots=True)
class Requirement:
    path: str
    value: str
    equal: bool

    def matches(self, value: str) -> bool:
        return (value == self.value) == self.equal


def parse_requirements(selector: str) -> list[Requirement]:
    """Parse ``a=b,c!=d,e==f`` (the equality-based syntax of field and label selectors)."""
    requirements = []
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            path, value = term.split("!=", 1)
            equal = False
        elif "=" in term:
            path, value = term.replace("==", "=", 1).split("=", 1)
            equal = True
        else:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {term!r}")
        requirements.append(Requirement(path.strip(), value.strip(), equal))
    return requirements


_PATHS: dict[str, tuple[str, ...]] = {}


def field_value(obj: Object, path: str) -> str:
    parts = _PATHS.get(path)
    if parts is None:
        parts = _PATHS[path] = tuple(path.split("."))
    value: Any = obj
    for part in parts:
        value = value.get(part) if type(value) is dict else None
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


@dataclass(frozen=True, slots=True)
class Filter:
    """Which objects a list or watch request sees: its namespace and selectors."""

    namespace: str | None = None
    fields: tuple[Requirement, ...] = ()
    labels: tuple[Requirement, ...] = ()

    @classmethod
    def from_query(cls, resource: str, namespace: str | None, query: Mapping[str, str]) -> Filter:
        fields = parse_requirements(query.get("fieldSelector", ""))
        for requirement in fields:
            if requirement.path not in SELECTABLE_FIELDS[resource]:
                raise ApiError(
                    400, "BadRequest", f'field label not supported: "{requirement.path}"'
                )
        labels = parse_requirements(query.get("labelSelector", ""))
        return cls(namespace, tuple(fields), tuple(labels))

    def matches_listed(self, obj: Object, fields: Mapping[str, str]) -> bool:
        """``matches`` for a stored object whose selectable fields' values are at hand."""
        metadata = obj["metadata"]
        if self.namespace is not None and metadata.get("namespace") != self.namespace:
            return False
        for requirement in self.fields:
            if (fields[requirement.path] == requirement.value) != requirement.equal:
                return False
        if not self.labels:
            return True
        labels = metadata.get("labels") or {}
        return all(r.matches(labels.get(r.path, "")) for r in self.labels)

    def matches(self, obj: Object | None) -> bool:
        if obj is None:
            return False
        metadata = obj["metadata"]
        if self.namespace is not None and metadata.get("namespace") != self.namespace:
            return False
        for requirement in self.fields:  # a loop, not all(): this runs for every listed object
            if (field_value(obj, requirement.path) == requirement.value) != requirement.equal:
                return False
        if not self.labels:
            return True
        labels = metadata.get("labels") or {}
        return all(r.matches(labels.get(r.path, "")) for r in self.labels)


# --------------------------------------------------------------------------------------------
# The store: objects, a global resourceVersion, and the history watches replay.


@dataclass(frozen=True, slots=True)
class Change:
    """One write: the object before (None when created) and after (its final state, stamped
    with the deletion's resourceVersion, when deleted)."""

    rv: int
    resource: str
    type: str  # ADDED, MODIFIED or DELETED
    old: Object | None
    new: Object
    encoded: bytes  # ``new`` as JSON, encoded once for every watch that sends it

    def seen_through(self, flt: Filter) -> Event | None:
        """The event a watch with this filter receives for this change, if any: an object
        that leaves the filter is DELETED for that watch, one that enters it is ADDED."""
        was = flt.matches(self.old)
        now = self.type != "DELETED" and flt.matches(self.new)
        if was and now:
            return "MODIFIED", self.new, self.encoded
        if was:
            return "DELETED", self.new, self.encoded
        if now:
            return "ADDED", self.new, self.encoded
        return None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every object of one resource at one resourceVersion, sorted by key (as etcd ranges),
    with each object's JSON (as an item of a list)."""

    rv: int
    keys: list[Key]
    objects: list[Object]
    encoded: list[bytes]
    fields: list[dict[str, str]]  # each object's selectable fields (SELECTABLE_FIELDS)


class Store:
    """Objects by resource and key. Stored objects are never mutated, only replaced, so
    snapshots and history can share them."""

    SNAPSHOTS_KEPT = 16

    def __init__(self) -> None:
        self.rv = 0
        self.compacted_rv = 0  # history holds every change after this resourceVersion
        self.objects: dict[str, dict[Key, Object]] = {resource: {} for resource in KINDS}
        # Each stored object's JSON, encoded once when it is written, and the values of its
        # selectable fields, read once: a list filters every object it pages through.
        self.encoded: dict[str, dict[Key, bytes]] = {resource: {} for resource in KINDS}
        self.fields: dict[str, dict[Key, dict[str, str]]] = {resource: {} for resource in KINDS}
        self.history: list[Change] = []
        self.watchers: set[Watcher] = set()
        self._snapshots: dict[tuple[str, int], Snapshot] = {}
        # Keys in order as of the last snapshot (some since deleted), and keys created since:
        # the next snapshot merges the two instead of sorting every key again.
        self._ordered: dict[str, list[Key]] = {resource: [] for resource in KINDS}
        self._created: dict[str, list[Key]] = {resource: [] for resource in KINDS}
        # UIDs unique to this store and cheap to make (uuid4 per object slows bulk loads).
        self._uid_prefix = str(uuid.uuid4())[:23]

    def get(self, resource: str, key: Key) -> Object:
        try:
            return self.objects[resource][key]
        except KeyError:
            name = key[1]
            raise ApiError(404, "NotFound", f'{resource} "{name}" not found') from None

    def create(self, resource: str, obj: Object) -> Object:
        key = object_key(obj)
        if key in self.objects[resource]:
            raise ApiError(409, "AlreadyExists", f'{resource} "{key[1]}" already exists')
        return self._commit(resource, "ADDED", None, obj)

    def replace(self, resource: str, obj: Object) -> Object:
        old = self.get(resource, object_key(obj))
        return self._commit(resource, "MODIFIED", old, obj)

    def remove(self, resource: str, key: Key) -> Object:
        old = self.get(resource, key)
        return self._commit(resource, "DELETED", old, copy.deepcopy(old))

    def _commit(self, resource: str, kind: str, old: Object | None, new: Object) -> Object:
        self.rv += 1
        metadata = new["metadata"]
        metadata["resourceVersion"] = str(self.rv)
        metadata.setdefault("uid", f"{self._uid_prefix}-{self.rv:012x}")
        metadata.setdefault("creationTimestamp", timestamp(int(time.time())))
        key = object_key(new)
        encoded = msgspec.json.encode(new)
        if kind == "DELETED":
            del self.objects[resource][key]
            del self.encoded[resource][key]
            del self.fields[resource][key]
        else:
            if kind == "ADDED":
                self._created[resource].append(key)
            self.objects[resource][key] = new
            self.encoded[resource][key] = encoded
            self.fields[resource][key] = {
                path: field_value(new, path) for path in SELECTABLE_FIELDS[resource]
            }
        change = Change(self.rv, resource, kind, old, new, encoded)
        self.history.append(change)
        for watcher in self.watchers:
            watcher.offer(change)
        return new

    def changes_after(self, rv: int) -> list[Change]:
        if rv < self.compacted_rv:
            raise too_old(rv)
        return self.history[bisect.bisect_right(self.history, rv, key=lambda c: c.rv) :]

    def snapshot(self, resource: str) -> Snapshot:
        cached = self._snapshots.get((resource, self.rv))
        if cached is not None:
            return cached
        objects, encoded = self.objects[resource], self.encoded[resource]
        # Two sorted runs, which sorted() merges in linear time; then each key once, and only
        # the keys that still exist.
        created = self._created[resource]
        created.sort()
        merged = sorted(self._ordered[resource] + created)
        created.clear()
        keys = [k for k, _ in itertools.groupby(merged) if k in objects]
        self._ordered[resource] = keys
        fields = self.fields[resource]
        snapshot = Snapshot(
            self.rv,
            keys,
            [objects[k] for k in keys],
            [encoded[k] for k in keys],
            [fields[k] for k in keys],
        )
        if len(self._snapshots) >= self.SNAPSHOTS_KEPT:
            del self._snapshots[next(iter(self._snapshots))]
        self._snapshots[(resource, self.rv)] = snapshot
        return snapshot

    def snapshot_at(self, resource: str, rv: int) -> Snapshot:
        snapshot = self._snapshots.get((resource, rv))
        if snapshot is None or rv < self.compacted_rv:
            raise ApiError(
                410,
                "Expired",
                "The provided continue parameter is too old to display a consistent list "
                "result. You can start a new list without the continue parameter.",
            )
        return snapshot

    def compact(self) -> None:
        self.compacted_rv = self.rv
        self.history.clear()
        self._snapshots.clear()


def object_key(obj: Object) -> Key:
    metadata = obj["metadata"]
    return metadata.get("namespace", ""), metadata["name"]


@functools.lru_cache(maxsize=1)
def timestamp(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _now() -> str:
    return timestamp(int(time.time()))


def with_kind(resource: str, obj: Object) -> Object:
    """Objects carry kind and apiVersion everywhere except as items of a list."""
    return {"kind": KINDS[resource], "apiVersion": "v1", **obj}


# --------------------------------------------------------------------------------------------
# Watches: each open watch stream has a Watcher, fed by the store as changes are committed.

DROP = "_DROP"  # close the connection abruptly, as a broken network would
END = "_END"  # end the stream cleanly, as timeoutSeconds does


class Watcher:
    def __init__(self, resource: str, flt: Filter, *, bookmarks: bool) -> None:
        self.resource = resource
        self.filter = flt
        self.bookmarks = bookmarks
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def offer(self, change: Change) -> None:
        if change.resource == self.resource:
            event = change.seen_through(self.filter)
            if event is not None:
                self.queue.put_nowait(event)

    def bookmark(self, rv: int) -> None:
        # The resourceVersion is taken now, when every change up to it is already queued
        # ahead of the bookmark: a bookmark promises the client it has seen all of them.
        if self.bookmarks:
            obj = {"kind": KINDS[self.resource], "apiVersion": "v1"}
            obj["metadata"] = {"resourceVersion": str(rv)}
            self.queue.put_nowait(("BOOKMARK", obj, None))

    def expire(self, rv: int) -> None:
        self.queue.put_nowait(("ERROR", too_old(rv).status(), None))

    def signal(self, what: str) -> None:
        self.queue.put_nowait((what, {}, None))


def encode_event(resource: str, kind: str, obj: Object, encoded: bytes | None = None) -> bytes:
    """One line of a watch stream. ``encoded``, the object's JSON as stored, is spliced in
    rather than the object encoded again (a burst of 10,000 events is otherwise mostly this):
    the same bytes as encoding ``{"type", "object": with_kind(...)}``."""
    if kind in ("ADDED", "MODIFIED", "DELETED"):
        if encoded is not None and len(encoded) > 2 and "kind" not in obj:
            head = f'{{"type":"{kind}","object":{{"kind":"{KINDS[resource]}","apiVersion":"v1",'
            return b"".join((head.encode(), memoryview(encoded)[1:], b"}\n"))
        obj = with_kind(resource, obj)
    return msgspec.json.encode({"type": kind, "object": obj}) + b"\n"


def json_patch(target: Object, operations: Any) -> Object:
    """RFC 6902, answering as the API server does: a patch it cannot read is 400; one that
    does not apply (a ``test`` that fails, a path that is not there) is 422."""
    try:
        patch = jsonpatch.JsonPatch(operations)
    except (jsonpatch.JsonPatchException, TypeError, AttributeError) as error:
        raise ApiError(400, "BadRequest", str(error)) from None
    try:
        return patch.apply(target)
    except jsonpatch.JsonPatchTestFailed as error:
        raise ApiError(422, "Invalid", f"the server rejected our request: {error}") from None
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as error:
        raise ApiError(422, "Invalid", str(error)) from None
    except (KeyError, TypeError) as error:  # an operation without its "path" or "value"
        raise ApiError(400, "BadRequest", f"invalid JSON patch: {error}") from None


def merge_patch(target: Any, patch: Any) -> Any:
    """JSON merge patch (RFC 7386): objects merge recursively, null removes, the rest replaces."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = merge_patch(result.get(name), value)
    return result


def random_suffix() -> str:
    return "".join(random.choices("bcdfghjklmnpqrstvwxz2456789", k=5))


def encode_continue(rv: int, key: Key) -> str:
    return base64.urlsafe_b64encode(json.dumps({"rv": rv, "start": key}).encode()).decode()


def decode_continue(token: str) -> tuple[int, Key]:
    try:
        decoded = json.loads(base64.urlsafe_b64decode(token.encode()))
        return int(decoded["rv"]), (decoded["start"][0], decoded["start"][1])
    except (ValueError, KeyError, TypeError, IndexError, binascii.Error):
        raise ApiError(400, "BadRequest", "invalid continue token") from None


def is_true(value: str | None) -> bool:
    return (value or "").lower() in ("true", "1")


# --------------------------------------------------------------------------------------------
# The server.


class KubeApiServer:
    """In-process Kubernetes API server. Control methods must be called from its event loop."""

    def __init__(
        self,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        token: str = DEFAULT_TOKEN,
        bookmark_interval: float = 60.0,
    ) -> None:
        self.port = port
        self.host = host
        self.token = token
        self.bookmark_interval = bookmark_interval
        self.url = ""
        self.store = Store()
        self.list_requests: Counter[str] = Counter()  # fresh lists (no continue token)
        self.list_pages: Counter[str] = Counter()  # every list request, continuations too
        self.watch_requests: Counter[str] = Counter()
        self.node_requests: Counter[str] = Counter()  # GET and PATCH of single nodes
        self._failures: dict[tuple[str, str], list[int]] = {}
        self._before_node_patch: dict[str, list[Any]] = {}
        self._runner: web.AppRunner | None = None

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(middlewares=[self._authenticate])
        app.router.add_get("/version", self._version)
        app.router.add_get("/version/", self._version)
        app.router.add_get("/api", self._api_versions)
        app.router.add_get("/api/v1/namespaces/{name}", self._get_namespace)
        app.router.add_get("/api/v1/namespaces/{namespace}/{resource}", self._collection)
        app.router.add_post("/api/v1/namespaces/{namespace}/events", self._create_event)
        app.router.add_get("/api/v1/namespaces/{namespace}/{resource}/{name}", self._get)
        app.router.add_patch("/api/v1/namespaces/{namespace}/events/{name}", self._patch_event)
        app.router.add_get("/api/v1/nodes/{name}", self._get_node)
        app.router.add_patch("/api/v1/nodes/{name}", self._patch_node)
        app.router.add_get("/api/v1/{resource}", self._collection)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.url = f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        for watcher in list(self.store.watchers):
            watcher.signal(END)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> KubeApiServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def write_kubeconfig(self, path: str) -> None:
        """Write a kubeconfig pointing at this server, as kubectl and the client read it."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "podiam-test", "cluster": {"server": self.url}}],
            "users": [{"name": "podiam-test", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "podiam-test",
                    "context": {"cluster": "podiam-test", "user": "podiam-test"},
                }
            ],
            "current-context": "podiam-test",
        }
        with open(path, "w") as file:
            yaml.safe_dump(config, file)

    # --- control API for tests --------------------------------------------------------------

    def add_namespace(
        self,
        name: str,
        annotations: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> Object:
        namespace = namespace_object(name, annotations=annotations, labels=labels)
        return copy.deepcopy(self.store.create("namespaces", namespace))

    def update_namespace(self, name: str, **changes: Any) -> Object:
        """Change ``annotations`` and/or ``labels`` (each replaced whole; None removes)."""
        obj = copy.deepcopy(self.store.get("namespaces", ("", name)))
        for change, value in changes.items():
            if change not in ("annotations", "labels"):
                raise TypeError(f"update_namespace cannot change {change!r}")
            set_or_remove(obj["metadata"], change, value)
        return copy.deepcopy(self.store.replace("namespaces", obj))

    def delete_namespace(self, name: str) -> Object:
        """Delete a namespace and, as the namespace controller does, every pod in it."""
        for namespace, pod in list(self.store.objects["pods"]):
            if namespace == name:
                self.delete_pod(namespace, pod)
        return copy.deepcopy(self.store.remove("namespaces", ("", name)))

    def add_pod(
        self,
        namespace: str,
        name: str,
        *,
        ip: str | None = None,
        host_ip: str | None = None,
        phase: str = "Running",
        annotations: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        host_network: bool = False,
        node_name: str | None = None,
    ) -> Object:
        """Add a pod. Its namespace need not exist: the server must cope with seeing a pod
        before its namespace, since the two watches are independent."""
        pod = pod_object(
            namespace,
            name,
            ip=ip,
            host_ip=host_ip,
            phase=phase,
            annotations=annotations,
            labels=labels,
            host_network=host_network,
            node_name=node_name,
        )
        return copy.deepcopy(self.store.create("pods", pod))

    def add_pods(self, specs: Iterable[Mapping[str, Any]]) -> int:
        """Add many pods quickly; each spec holds add_pod's arguments by name."""
        count = 0
        # Collecting garbage while building 100,000 objects that are all kept doubles the time.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for spec in specs:
                self.store.create("pods", pod_object(**spec))
                count += 1
        finally:
            if gc_was_enabled:
                gc.enable()
        return count

    def update_pod(self, namespace: str, name: str, **changes: Any) -> Object:
        """Change ``ip``, ``host_ip``, ``phase``, ``annotations``, ``labels``, ``node_name``
        or ``host_network`` (annotations and labels are replaced whole)."""
        pod = copy.deepcopy(self.store.get("pods", (namespace, name)))
        metadata, spec, status = pod["metadata"], pod["spec"], pod["status"]
        for change, value in changes.items():
            if change == "ip":
                set_or_remove(status, "podIP", value)
                set_or_remove(status, "podIPs", [{"ip": value}] if value else None)
            elif change == "host_ip":
                set_or_remove(status, "hostIP", value)
                set_or_remove(status, "hostIPs", [{"ip": value}] if value else None)
            elif change == "phase":
                status["phase"] = value
            elif change in ("annotations", "labels"):
                set_or_remove(metadata, change, dict(value) if value else None)
            elif change == "node_name":
                set_or_remove(spec, "nodeName", value)
            elif change == "host_network":
                set_or_remove(spec, "hostNetwork", True if value else None)
            else:
                raise TypeError(f"update_pod cannot change {change!r}")
        return copy.deepcopy(self.store.replace("pods", pod))

    def delete_pod(self, namespace: str, name: str) -> Object:
        return copy.deepcopy(self.store.remove("pods", (namespace, name)))

    # --- a pod's life as the control plane writes it ---------------------------------------
    # As kube-apiserver, the scheduler and kwok write a Deployment's pod (seen through a watch
    # with podiam's field selector; bench/server_scale.py's notes): created Pending and
    # unscheduled (add_pod with phase="Pending" and no IPs), bound to a node, started (IPs,
    # Running, Ready), marked for deletion with its grace period, marked again with none once
    # its containers stopped, then deleted. These write the steps between, sharing what did not
    # change with the stored object (never mutated) and returning nothing, so that a benchmark
    # can replay a rollout of tens of thousands of pods at the rate of a real API server.

    def bind_pod(self, namespace: str, name: str, node_name: str) -> None:
        """The scheduler's binding: spec.nodeName and the PodScheduled condition."""
        pod = self.store.get("pods", (namespace, name))
        scheduled = {"type": "PodScheduled", "status": "True", "lastTransitionTime": _now()}
        self.store.replace("pods", {
            **pod, "metadata": dict(pod["metadata"]),
            "spec": {**pod["spec"], "nodeName": node_name},
            "status": {**pod["status"], "conditions": [scheduled]},
        })  # fmt: skip

    def start_pod(self, namespace: str, name: str, *, ip: str, host_ip: str) -> None:
        """The kubelet's report of a started pod: its IPs, Running, every condition True."""
        pod = self.store.get("pods", (namespace, name))
        now = _now()
        conditions = [
            {"type": kind, "status": "True", "lastTransitionTime": now}
            for kind in ("Initialized", "ContainersReady", "Ready", "PodScheduled")
        ]
        containers = [
            {"name": c["name"], "image": c["image"], "ready": True, "restartCount": 0,
             "state": {"running": {"startedAt": now}}}
            for c in pod["spec"].get("containers", ())
        ]  # fmt: skip
        status = {
            "phase": "Running", "conditions": conditions, "containerStatuses": containers,
            "hostIP": host_ip, "hostIPs": [{"ip": host_ip}], "podIP": ip, "podIPs": [{"ip": ip}],
            "startTime": now,
        }  # fmt: skip
        self.store.replace("pods", {**pod, "metadata": dict(pod["metadata"]), "status": status})

    def mark_pod_deleted(self, namespace: str, name: str, grace_seconds: int) -> None:
        """A graceful delete (deletionTimestamp, deletionGracePeriodSeconds, the generation
        bumped), or, with 0, the kubelet's final one once the containers have stopped."""
        pod = self.store.get("pods", (namespace, name))
        metadata = {
            **pod["metadata"], "deletionGracePeriodSeconds": grace_seconds,
            "deletionTimestamp": timestamp(int(time.time()) + grace_seconds),
        }  # fmt: skip
        if "deletionTimestamp" not in pod["metadata"]:
            metadata["generation"] = metadata.get("generation", 1) + 1
        self.store.replace("pods", {**pod, "metadata": metadata})

    def add_node(
        self,
        name: str,
        *,
        internal_ip: str | None = None,
        taints: Iterable[Mapping[str, str]] = (),
        labels: Mapping[str, str] | None = None,
    ) -> Object:
        """Add a node with these taints (``key``, ``value``, ``effect`` each) and addresses."""
        node = node_object(name, internal_ip=internal_ip, taints=taints, labels=labels)
        return copy.deepcopy(self.store.create("nodes", node))

    def node(self, name: str) -> Object:
        return copy.deepcopy(self.store.get("nodes", ("", name)))

    def taints(self, name: str) -> list[Object]:
        return self.node(name)["spec"].get("taints") or []

    def set_taints(self, name: str, taints: Iterable[Mapping[str, str]]) -> Object:
        node = self.node(name)
        set_or_remove(node["spec"], "taints", [dict(t) for t in taints] or None)
        return copy.deepcopy(self.store.replace("nodes", node))

    def fail_next(self, method: str, resource: str, code: int, times: int = 1) -> None:
        """Answer the next ``times`` ``method`` requests for single ``resource`` objects
        (only ``nodes`` so far) with HTTP ``code``, as an overloaded API server would."""
        self._failures.setdefault((method, resource), []).extend([code] * times)

    def before_node_patch(self, name: str, action: Any) -> None:
        """Run ``action(kube)`` once, just before the next PATCH of node ``name`` is applied:
        another controller's write landing between a client's read and its patch."""
        self._before_node_patch.setdefault(name, []).append(action)

    def compact(self) -> None:
        """Forget all history, as etcd compaction does: any older resourceVersion is 410."""
        self.store.compact()

    def drop_watches(self) -> None:
        """Break every open watch connection without a final event."""
        for watcher in self.store.watchers:
            watcher.signal(DROP)

    def expire_watches(self) -> None:
        """Send every open watch the 410 ERROR event that ends it, as after compaction."""
        for watcher in self.store.watchers:
            watcher.expire(self.store.compacted_rv)

    def send_bookmarks(self) -> None:
        for watcher in self.store.watchers:
            watcher.bookmark(self.store.rv)

    @property
    def events(self) -> list[Object]:
        """Events received, in the order they were created, in their current state."""
        return list(self.store.objects["events"].values())

    @property
    def open_watches(self) -> int:
        return len(self.store.watchers)

    def watching(self, resource: str) -> int:
        """How many watches of ``resource`` are open: a test that breaks or bookmarks watches
        must first see one open, or it acts on nothing."""
        return sum(1 for watcher in self.store.watchers if watcher.resource == resource)

    # --- HTTP handlers ----------------------------------------------------------------------

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Any) -> web.StreamResponse:
        authorization = request.headers.get("Authorization")
        if authorization is not None and authorization != f"Bearer {self.token}":
            return ApiError(401, "Unauthorized", "Unauthorized").response()
        try:
            return await handler(request)
        except ApiError as error:
            return error.response()
        except web.HTTPException as error:  # no such route or method: answer as the API does
            reason = error.reason.replace(" ", "")
            return ApiError(error.status, reason, error.text or error.reason).response()

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "major": "1",
                "minor": "30",
                "gitVersion": "v1.30.0-podiam-test",
                "gitCommit": "0000000000000000000000000000000000000000",
                "gitTreeState": "clean",
                "buildDate": "2024-01-01T00:00:00Z",
                "goVersion": "go1.22.0",
                "compiler": "gc",
                "platform": "linux/amd64",
            }
        )

    async def _api_versions(self, request: web.Request) -> web.Response:
        return web.json_response({"kind": "APIVersions", "versions": ["v1"]})

    async def _get_namespace(self, request: web.Request) -> web.Response:
        obj = self.store.get("namespaces", ("", request.match_info["name"]))
        return web.json_response(with_kind("namespaces", obj))

    def _injected(self, method: str, resource: str) -> None:
        self.node_requests[method] += 1
        pending = self._failures.get((method, resource))
        if pending:
            code = pending.pop(0)
            raise ApiError(code, "InternalError" if code >= 500 else "Injected", "injected failure")

    async def _get_node(self, request: web.Request) -> web.Response:
        self._injected("GET", "nodes")
        obj = self.store.get("nodes", ("", request.match_info["name"]))
        return web.json_response(with_kind("nodes", obj))

    async def _patch_node(self, request: web.Request) -> web.Response:
        self._injected("PATCH", "nodes")
        key = ("", request.match_info["name"])
        self.store.get("nodes", key)  # 404 before reading the body, as the API server does
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "BadRequest", "request body is not JSON") from None
        actions = self._before_node_patch.get(key[1], [])
        while actions:
            actions.pop(0)(self)
        current = with_kind("nodes", self.store.get("nodes", key))
        if request.content_type == JSON_PATCH_TYPE:
            patched = json_patch(copy.deepcopy(current), body)
        elif request.content_type in MERGE_PATCH_TYPES:
            if not isinstance(body, dict):
                raise ApiError(400, "BadRequest", "request body is not a JSON object")
            patched = merge_patch(copy.deepcopy(current), body)
        else:
            raise ApiError(415, "UnsupportedMediaType", f"{request.content_type} not supported")
        metadata = patched.get("metadata") if isinstance(patched, dict) else None
        if not isinstance(metadata, dict):
            raise ApiError(422, "Invalid", "metadata: Required value")
        # A resourceVersion in the patched object is a precondition, as in an update.
        sent = metadata.get("resourceVersion")
        if sent is not None and sent != current["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on nodes "{key[1]}": the object has been '
                "modified; please apply your changes to the latest version and try again",
            )
        for field in ("name", "uid", "creationTimestamp"):
            if metadata.get(field) != current["metadata"].get(field):
                raise ApiError(422, "Invalid", f"metadata.{field}: field is immutable")
        if patched.get("spec", {}).get("taints") == []:
            del patched["spec"]["taints"]  # an empty list is not stored (omitempty)
        obj = self.store.replace("nodes", strip_kind(patched))
        return web.json_response(with_kind("nodes", obj))

    async def _get(self, request: web.Request) -> web.Response:
        resource = namespaced_resource(request)
        obj = self.store.get(
            resource, (request.match_info["namespace"], request.match_info["name"])
        )
        return web.json_response(with_kind(resource, obj))

    async def _collection(self, request: web.Request) -> web.StreamResponse:
        namespace = request.match_info.get("namespace")
        resource = namespaced_resource(request) if namespace else request.match_info["resource"]
        if resource not in KINDS:
            raise ApiError(404, "NotFound", f"the server could not find resource {resource!r}")
        flt = Filter.from_query(resource, namespace, request.query)
        if is_true(request.query.get("watch")):
            self.watch_requests[resource] += 1
            return await self._watch(request, resource, flt)
        return self._list(request, resource, flt)

    def _list(self, request: web.Request, resource: str, flt: Filter) -> web.Response:
        query = request.query
        token = query.get("continue")
        self.list_pages[resource] += 1
        if token:
            rv, start = decode_continue(token)
            snapshot = self.store.snapshot_at(resource, rv)
            position = bisect.bisect_right(snapshot.keys, start)
        else:
            self.list_requests[resource] += 1
            # resourceVersion "" (most recent) and "0" (any) both get the latest state here;
            # only an exact match on a compacted version is refused, as etcd would.
            requested = query.get("resourceVersion", "")
            exact = query.get("resourceVersionMatch") == "Exact"
            if exact and requested.isdigit() and int(requested) < self.store.compacted_rv:
                raise too_old(int(requested))
            snapshot = self.store.snapshot(resource)
            position = bisect.bisect_left(snapshot.keys, (flt.namespace or "", ""))
        limit = int(query.get("limit") or 0)
        positions, resume_after = page_positions(snapshot, flt, position, limit)
        metadata: Object = {"resourceVersion": str(snapshot.rv)}
        if resume_after is not None:
            metadata["continue"] = encode_continue(snapshot.rv, resume_after)
        head = {"kind": KINDS[resource] + "List", "apiVersion": "v1", "metadata": metadata}
        # The items as they were encoded when written: {...head, "items": [item, ...]}.
        encoded = snapshot.encoded
        body = b"".join(
            (
                msgspec.json.encode(head)[:-1],
                b',"items":[',
                b",".join([encoded[i] for i in positions]),
                b"]}",
            )
        )
        return web.Response(body=body, content_type="application/json")

    async def _watch(self, request: web.Request, resource: str, flt: Filter) -> web.StreamResponse:
        query = request.query
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        watcher = Watcher(resource, flt, bookmarks=is_true(query.get("allowWatchBookmarks")))
        try:
            initial = self._initial_events(resource, flt, query.get("resourceVersion", ""))
        except ApiError as error:
            # A watch is refused inside the stream, not with an HTTP status.
            await response.prepare(request)
            await response.write(encode_event(resource, "ERROR", error.status()))
            return response
        # No await between computing the initial events and registering: nothing is missed. And
        # registered before the headers go out: a client holding the response is watching, so
        # a test may drop or bookmark its watch at once.
        self.store.watchers.add(watcher)
        try:
            await response.prepare(request)
            await response.write(b"".join(encode_event(resource, *event) for event in initial))
            timeout = float(query.get("timeoutSeconds") or 0)
            deadline = asyncio.get_running_loop().time() + timeout if timeout > 0 else None
            await self._stream(request, response, watcher, deadline)
        finally:
            self.store.watchers.discard(watcher)
        return response

    def _initial_events(self, resource: str, flt: Filter, rv: str) -> list[Event]:
        if rv in ("", "0"):
            # No version: the current state as synthetic ADDED events, then live changes.
            snapshot = self.store.snapshot(resource)
            return [
                ("ADDED", obj, encoded)
                for obj, encoded in zip(snapshot.objects, snapshot.encoded, strict=True)
                if flt.matches(obj)
            ]
        if not rv.isdigit():
            raise ApiError(400, "BadRequest", f"invalid resourceVersion {rv!r}")
        events = []
        for change in self.store.changes_after(int(rv)):
            if change.resource == resource and (event := change.seen_through(flt)):
                events.append(event)
        return events

    async def _stream(
        self,
        request: web.Request,
        response: web.StreamResponse,
        watcher: Watcher,
        deadline: float | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            wait = self.bookmark_interval
            if deadline is not None:
                wait = min(wait, deadline - loop.time())
            try:
                async with asyncio.timeout(max(wait, 0)):
                    batch = [await watcher.queue.get()]
            except TimeoutError:
                if deadline is not None and loop.time() >= deadline:
                    return
                watcher.bookmark(self.store.rv)
                continue
            while not watcher.queue.empty():
                batch.append(watcher.queue.get_nowait())
            lines, finished = [], False
            for kind, obj, encoded in batch:
                if kind == DROP:
                    abort(request)
                    return
                if kind == END:
                    finished = True
                    break
                lines.append(encode_event(watcher.resource, kind, obj, encoded))
                if kind == "ERROR":  # the API server ends a watch after an ERROR event
                    finished = True
                    break
            if lines:
                try:
                    await response.write(b"".join(lines))
                except ConnectionResetError:
                    return  # the client went away: its watch ends, as on the real API server
            if finished:
                return

    async def _create_event(self, request: web.Request) -> web.Response:
        namespace = request.match_info["namespace"]
        self.store.get("namespaces", ("", namespace))
        body = await json_body(request)
        metadata = body.setdefault("metadata", {})
        if metadata.get("namespace", namespace) != namespace:
            raise ApiError(400, "BadRequest", "the namespace of the object does not match")
        metadata["namespace"] = namespace
        if not metadata.get("name"):
            if not metadata.get("generateName"):
                raise ApiError(422, "Invalid", "metadata.name or generateName is required")
            metadata["name"] = metadata["generateName"] + random_suffix()
        obj = self.store.create("events", strip_kind(body))
        return web.json_response(with_kind("events", obj), status=201)

    async def _patch_event(self, request: web.Request) -> web.Response:
        if request.content_type not in MERGE_PATCH_TYPES:
            raise ApiError(415, "UnsupportedMediaType", f"{request.content_type} not supported")
        key = (request.match_info["namespace"], request.match_info["name"])
        current = self.store.get("events", key)
        patched = merge_patch(copy.deepcopy(current), strip_kind(await json_body(request)))
        # Identity is not patchable.
        for field in ("name", "namespace", "uid", "creationTimestamp"):
            patched.setdefault("metadata", {})[field] = current["metadata"][field]
        obj = self.store.replace("events", patched)
        return web.json_response(with_kind("events", obj))


def namespaced_resource(request: web.Request) -> str:
    resource = request.match_info["resource"]
    if resource not in NAMESPACED:
        raise ApiError(404, "NotFound", f"the server could not find resource {resource!r}")
    return resource


def page_positions(
    snapshot: Snapshot, flt: Filter, position: int, limit: int
) -> tuple[list[int], Key | None]:
    """The positions of up to ``limit`` (0: all) matching objects from ``position``, and the
    key to resume after when more remain."""
    found: list[int] = []
    keys, objects, fields = snapshot.keys, snapshot.objects, snapshot.fields
    matches = flt.matches_listed
    while position < len(keys):
        if flt.namespace is not None and keys[position][0] != flt.namespace:
            break
        if matches(objects[position], fields[position]):
            found.append(position)
            if len(found) == limit:
                more = position + 1 < len(keys)
                return found, keys[position] if more else None
        position += 1
    return found, None


async def json_body(request: web.Request) -> Object:
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(400, "BadRequest", "request body is not JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "BadRequest", "request body is not a JSON object")
    return body


def strip_kind(obj: Object) -> Object:
    return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}


def set_or_remove(target: Object, name: str, value: Any) -> None:
    if value is None:
        target.pop(name, None)
    else:
        target[name] = value


def abort(request: web.Request) -> None:
    """Close the connection under a streaming response, without the final chunk."""
    if request.transport is not None:
        request.transport.abort()


# --------------------------------------------------------------------------------------------
# Standalone: python -m tests.support.kubeapi --port N


async def serve(port: int, kubeconfig: str | None) -> None:
    async with KubeApiServer(port=port) as kube:
        kube.add_namespace("default")
        if kubeconfig:
            kube.write_kubeconfig(kubeconfig)
        print(kube.url, flush=True)
        await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="Kubernetes API test server (core/v1 subset)")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free)")
    parser.add_argument("--kubeconfig", help="also write a kubeconfig for it to this path")
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.port, args.kubeconfig))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
