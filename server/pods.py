"""Slim records of the Kubernetes objects podiam cares about, built from the API's objects as
server/kube_wire.py decodes them (or from raw dictionaries, converted to that shape first).

Full model objects cost kilobytes each; podiam keeps a handful of strings per pod, and shares
every string that repeats between pods (namespace, node, phase, role, workload, service account)
so that 550,000 pods fit in a few hundred megabytes and a re-list is a dictionary walk.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Any

import msgspec

from server import kube_wire
from server.kube_wire import (
    EXTERNAL_ID_ANNOTATION,
    PERMITTED_ANNOTATION,
    POD_TEMPLATE_HASH_LABEL,
    ROLE_ANNOTATION,
    SESSION_NAME_ANNOTATION,
)
from server.permitted import PatternError, PermittedPattern

__all__ = [
    "EXTERNAL_ID_ANNOTATION",
    "FINISHED_PHASES",
    "PERMITTED_ANNOTATION",
    "POD_TEMPLATE_HASH_LABEL",
    "ROLE_ANNOTATION",
    "SESSION_NAME_ANNOTATION",
    "UNFINISHED_PODS",
    "NamespaceRecord",
    "PodRecord",
    "is_finished",
    "namespace_from_object",
    "object_key",
    "pod_from_object",
    "workload_of",
]

# A Deployment's ReplicaSets are named <deployment>-<pod-template-hash>, the label its pods carry.
# (StatefulSets and DaemonSets own their pods directly; their controller-revision-hash label
# names a revision, which changes on every rollout, so it is never part of a workload's name.)
# A CronJob names each Job <cronjob>-<scheduled time in minutes since the epoch>.
_CRONJOB_JOB_NAME = re.compile(r"(?P<cronjob>.+)-\d{8,}")

# Pods in these phases have stopped for good; their IP may already belong to another pod.
FINISHED_PHASES = frozenset({"Succeeded", "Failed"})
# The pod watch's field selector: only pods that have not finished. The API server then sends a
# pod's move to a finished phase as its deletion.
UNFINISHED_PODS = ",".join(f"status.phase!={phase}" for phase in sorted(FINISHED_PHASES))


def is_finished(phase: str) -> bool:
    return phase in FINISHED_PHASES


class PodRecord(msgspec.Struct, frozen=True, gc=False):
    """A pod as podiam keeps it: immutable, compared and hashed by value. A msgspec struct
    rather than a dataclass: one is made for every pod of every list, and a frozen dataclass's
    ``__init__`` (one ``object.__setattr__`` per field) was most of that; nor does the garbage
    collector need to track objects that hold only strings."""

    uid: str
    namespace: str
    name: str
    ip: str  # status.podIP; empty until the pod has one
    host_ip: str  # status.hostIP: the node the pod runs on
    phase: str
    host_network: bool
    role: str  # the role annotation as written (short name or ARN); empty if none
    external_id: str
    session_name: str
    # The pod's controller as "<Kind>/<name>" (Deployment/web, StatefulSet/db, CronJob/nightly):
    # one interned string shared by all replicas; empty for a bare pod (see ``workload``).
    controller: str = ""
    service_account: str = ""

    @property
    def workload(self) -> str:
        """The pod's workload as "<Kind>/<name>": its controller, or "Pod/<name>" for a bare
        pod (made when asked, so that bare pods do not each keep one more string)."""
        return self.controller or f"Pod/{self.name}"

    @property
    def workload_name(self) -> str:
        return self.controller.partition("/")[2] or self.name

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def active(self) -> bool:
        """Whether this pod may be identified by its IP: running on the pod network and not
        finished. hostNetwork pods share the node's IP, so an IP can never name one of them."""
        return bool(self.ip) and not self.host_network and not is_finished(self.phase)


@dataclass(frozen=True, slots=True)
class NamespaceRecord:
    name: str
    uid: str
    permitted: str  # the raw annotation; empty when missing
    pattern: PermittedPattern | None  # compiled when permitted is a valid, non-empty regex
    error: str  # why permitted could not be compiled; empty otherwise


def object_key(obj: Any) -> tuple[str, str]:
    """(namespace, name) of an object, decoded or a raw dictionary."""
    return kube_wire.object_key(obj)


_intern = sys.intern


def pod_from_object(obj: Any) -> PodRecord:
    """The record of a pod, from its wire struct or a raw dictionary (ValueError when the
    dictionary does not have the shape of a pod)."""
    pod = kube_wire.as_wire(obj, kube_wire.Pod)
    meta = pod.metadata or _NO_POD_META
    spec = pod.spec or _NO_SPEC
    status = pod.status or _NO_STATUS
    annotations = meta.annotations or _NO_ANNOTATIONS
    # Whatever repeats across pods is interned: one string for each namespace, node, role.
    return PodRecord(
        uid=meta.uid or "",
        namespace=_intern(meta.namespace or ""),
        name=meta.name or "",
        ip=status.podIP or "",
        host_ip=_intern(status.hostIP or ""),
        phase=_intern(status.phase or ""),
        host_network=bool(spec.hostNetwork),
        role=_intern((annotations.role or "").strip()),
        external_id=_intern(annotations.external_id or ""),
        session_name=_intern((annotations.session_name or "").strip()),
        controller=_controller(meta),
        service_account=_intern(spec.serviceAccountName or "default"),
    )


_NO_POD_META = kube_wire.PodMeta()
_NO_SPEC = kube_wire.PodSpec()
_NO_STATUS = kube_wire.PodStatus()
_NO_ANNOTATIONS = kube_wire.PodAnnotations()
_NO_LABELS = kube_wire.PodLabels()


def workload_of(meta: Any) -> str:
    """The workload that owns a pod, as "<Kind>/<name>", from its controller owner reference and
    the controllers' naming conventions; "Pod/<name>" when no controller owns it. ``meta`` is
    the pod's metadata, decoded or a raw dictionary.

    A pod names only its direct owner, so a Deployment is recognised through its ReplicaSet's
    name (<deployment>-<pod-template-hash>) and a CronJob through its Job's name
    (<cronjob>-<minutes since the epoch>). Reading the ReplicaSet or Job themselves would be
    exact, but costs a watch of each kind for what the names already say."""
    meta = kube_wire.as_wire(meta, kube_wire.PodMeta)
    return _controller(meta) or f"Pod/{meta.name or ''}"


def _controller(meta: kube_wire.PodMeta) -> str:
    """The controller's workload, interned; "" for a pod no controller owns."""
    if not meta.ownerReferences:
        return ""
    owner = next((ref for ref in meta.ownerReferences if ref.controller), None)
    if owner is None or not owner.kind or not owner.name:
        return ""
    kind, name = owner.kind, owner.name
    if kind == "ReplicaSet":
        template_hash = (meta.labels or _NO_LABELS).pod_template_hash or ""
        if template_hash and name.endswith(f"-{template_hash}"):
            return _intern(f"Deployment/{name[: -len(template_hash) - 1]}")
    elif kind == "Job":
        match = _CRONJOB_JOB_NAME.fullmatch(name)
        if match:
            return _intern(f"CronJob/{match['cronjob']}")
    return _intern(f"{kind}/{name}")


def namespace_from_object(obj: Any) -> NamespaceRecord:
    """The record of a namespace, from its wire struct or a raw dictionary."""
    namespace = kube_wire.as_wire(obj, kube_wire.Namespace)
    meta = namespace.metadata or kube_wire.NamespaceMeta()
    permitted = ((meta.annotations or kube_wire.NamespaceAnnotations()).permitted or "").strip()
    pattern, error = None, ""
    if permitted:
        try:
            pattern = PermittedPattern(permitted)
        except PatternError as exc:
            error = (
                f"invalid {PERMITTED_ANNOTATION} regular expression, so nothing is permitted: {exc}"
            )
    return NamespaceRecord(
        name=_intern(meta.name or ""),
        uid=meta.uid or "",
        permitted=permitted,
        pattern=pattern,
        error=error,
    )
