"""The few fields podiam reads of pods and namespaces, decoded straight from the API server's
JSON into small structs, and the codecs that decode list pages and watch events with them.

A pod as the API server sends it is kilobytes of JSON (containers, volumes, managed fields);
podiam reads a dozen of its fields. Decoding the whole object into dictionaries first, then
picking those fields, made the decoding most of a 550,000-pod sync and left the process's heap
fragmented by the garbage. msgspec decodes only what these structs name, skipping everything
else without building it, and checks the types on the way (an annotation that is not a string
is a validation error, not a crash later). Annotations and labels are structs too, with one
field per key podiam reads: the others are skipped like any unknown field.

Everything is optional, as in the API's own types: a missing field is None, never an error.
Nothing here holds a reference cycle, so the structs are not tracked by the garbage collector.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import msgspec
from msgspec import Raw, Struct, field

ROLE_ANNOTATION = "iam.amazonaws.com/role"
PERMITTED_ANNOTATION = "iam.amazonaws.com/permitted"
EXTERNAL_ID_ANNOTATION = "iam.amazonaws.com/external-id"
SESSION_NAME_ANNOTATION = "iam.amazonaws.com/session-name"
POD_TEMPLATE_HASH_LABEL = "pod-template-hash"


class _Wire(Struct, gc=False):
    pass


class OwnerReference(_Wire):
    kind: str | None = None
    name: str | None = None
    controller: bool | None = None


class PodAnnotations(_Wire):
    role: str | None = field(default=None, name=ROLE_ANNOTATION)
    external_id: str | None = field(default=None, name=EXTERNAL_ID_ANNOTATION)
    session_name: str | None = field(default=None, name=SESSION_NAME_ANNOTATION)


class PodLabels(_Wire):
    pod_template_hash: str | None = field(default=None, name=POD_TEMPLATE_HASH_LABEL)


class PodMeta(_Wire):
    name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    resourceVersion: str | None = None  # the API's own spelling, camelCase
    annotations: PodAnnotations | None = None
    labels: PodLabels | None = None
    ownerReferences: list[OwnerReference] | None = None


class PodSpec(_Wire):
    hostNetwork: bool | None = None
    serviceAccountName: str | None = None


class PodStatus(_Wire):
    phase: str | None = None
    podIP: str | None = None
    hostIP: str | None = None


class Pod(_Wire):
    metadata: PodMeta | None = None
    spec: PodSpec | None = None
    status: PodStatus | None = None


class NamespaceAnnotations(_Wire):
    permitted: str | None = field(default=None, name=PERMITTED_ANNOTATION)


class NamespaceMeta(_Wire):
    name: str | None = None
    namespace: str | None = None  # never set: namespaces are cluster-scoped
    uid: str | None = None
    resourceVersion: str | None = None
    annotations: NamespaceAnnotations | None = None


class Namespace(_Wire):
    metadata: NamespaceMeta | None = None


WireObject = Pod | Namespace
T = TypeVar("T")


class _ListMeta(_Wire):
    resourceVersion: str | None = None
    continue_: str | None = field(default=None, name="continue")


class _PageHead(_Wire):
    """A list page with its items left undecoded: enough to ask for the next page at once."""

    metadata: _ListMeta | None = None
    items: Raw = field(default_factory=Raw)  # empty when absent


class _EventHead(_Wire):
    type: Any = None
    object: Raw = field(default_factory=Raw)  # empty when absent


_OBJECT_EVENTS = frozenset({"ADDED", "MODIFIED", "DELETED"})


class Page(Generic[T]):
    """One page of a list: its items (wire structs, or dictionaries for a plain codec), the
    snapshot's resourceVersion and the token of the next page ("" on the last)."""

    __slots__ = ("_codec", "_items", "continue_token", "resource_version")

    def __init__(self, codec: Codec, items: Raw, version: str, token: str) -> None:
        self._codec = codec
        self._items = items
        self.resource_version = version
        self.continue_token = token

    def items(self) -> list[Any]:
        """The items, decoded now (after the next page was asked for)."""
        return self._codec.items(self._items)


class Codec:
    """Decodes one resource's list pages and watch events: into ``wire`` structs, or into plain
    dictionaries when ``wire`` is None (sinks that want whole objects, such as tests')."""

    def __init__(self, wire: type | None) -> None:
        self.wire = wire
        self._head = msgspec.json.Decoder(_PageHead)
        self._event = msgspec.json.Decoder(_EventHead)
        self._any = msgspec.json.Decoder()
        self._one = msgspec.json.Decoder(wire) if wire is not None else self._any
        # The common event (an object of the expected shape) in one pass; anything else takes
        # the two-step path below.
        self._typed = None
        if wire is not None:
            typed = msgspec.defstruct(
                "_TypedEvent",
                [("type", Any, None), ("object", wire | None, None)],
                gc=False,
            )
            self._typed = msgspec.json.Decoder(typed)
        self._many = msgspec.json.Decoder(list[wire]) if wire is not None else self._any

    def page(self, body: bytes) -> Page:
        """A list answer's metadata, its items left for ``Page.items``. Raises ValueError when
        the answer is not a list (not JSON, no resourceVersion)."""
        head = self._head.decode(body)  # ValidationError and DecodeError are ValueErrors
        meta = head.metadata
        if meta is None or meta.resourceVersion is None:
            raise ValueError("the list answer has no metadata.resourceVersion")
        return Page(self, head.items, meta.resourceVersion, meta.continue_ or "")

    def items(self, raw: Raw) -> list[Any]:
        if not raw:
            return []
        try:
            items = self._many.decode(raw)
        except msgspec.ValidationError:
            # Some item does not have the shape podiam reads: hand over the raw dictionaries,
            # so the sink rejects that one item (logged) and takes the others.
            items = self._any.decode(raw)
        if items is None:
            return []
        if not isinstance(items, list):
            raise ValueError("the list answer's items are not a list")
        return items

    def event(self, line: bytes) -> tuple[str, Any, str | None] | None:
        """A watch event as (type, object, the object's resourceVersion); None when malformed
        (no type, no object). ADDED, MODIFIED and DELETED objects are wire structs where they
        have the expected shape; everything else (ERROR's Status, BOOKMARK) is a dictionary.
        Raises ValueError for a line that is not JSON."""
        if self._typed is not None:
            try:
                typed = self._typed.decode(line)
            except msgspec.ValidationError:
                pass  # not of the expected shape: decided below, as for any other event
            else:
                obj = typed.object
                if obj is not None and typed.type in _OBJECT_EVENTS:
                    return typed.type, obj, resource_version(obj)
        try:
            head = self._event.decode(line)
        except msgspec.ValidationError:
            return None  # JSON, but not an object with a type and an object
        kind, raw = head.type, head.object
        if not isinstance(kind, str) or not raw or memoryview(raw)[:1] != b"{":
            return None
        obj: Any = None
        if self.wire is not None and kind in ("ADDED", "MODIFIED", "DELETED"):
            try:
                obj = self._one.decode(raw)
            except msgspec.ValidationError:
                obj = None  # the sink will reject it as a dictionary, and say why
        if obj is None:
            obj = self._any.decode(raw)
        return kind, obj, resource_version(obj)


def resource_version(obj: Any) -> str | None:
    """metadata.resourceVersion of a wire struct or a dictionary."""
    if isinstance(obj, dict):
        metadata = obj.get("metadata")
        return metadata.get("resourceVersion") if isinstance(metadata, dict) else None
    metadata = obj.metadata
    return metadata.resourceVersion if metadata is not None else None


def as_wire(obj: Any, wire: type[T]) -> T:
    """``obj`` as a ``wire`` struct: decoded ones pass through; dictionaries (tests, tools, a
    list item of unexpected shape) are converted, raising ValueError when they do not fit."""
    if isinstance(obj, wire):
        return obj
    return msgspec.convert(obj, wire)


def object_key(obj: Any) -> tuple[str, str]:
    """(namespace, name) of a wire struct or a dictionary; namespace "" if cluster-scoped."""
    if isinstance(obj, dict):
        meta = obj.get("metadata") or {}
        return (meta.get("namespace") or "", meta.get("name") or "")
    meta = obj.metadata
    if meta is None:
        return ("", "")
    return (meta.namespace or "", meta.name or "")
