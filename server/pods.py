"""Slim records of the Kubernetes objects podiam cares about, built from raw API dictionaries.

Full model objects cost kilobytes each; podiam keeps a handful of strings per pod so that a
100,000-pod cluster fits in a few tens of megabytes and a re-list is a dictionary walk.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Any

from server.permitted import PatternError, PermittedPattern

ROLE_ANNOTATION = "iam.amazonaws.com/role"
PERMITTED_ANNOTATION = "iam.amazonaws.com/permitted"
EXTERNAL_ID_ANNOTATION = "iam.amazonaws.com/external-id"
SESSION_NAME_ANNOTATION = "iam.amazonaws.com/session-name"
# A Deployment's ReplicaSets are named <deployment>-<pod-template-hash>, the label its pods carry.
# (StatefulSets and DaemonSets own their pods directly; their controller-revision-hash label
# names a revision, which changes on every rollout, so it is never part of a workload's name.)
POD_TEMPLATE_HASH_LABEL = "pod-template-hash"
# A CronJob names each Job <cronjob>-<scheduled time in minutes since the epoch>.
_CRONJOB_JOB_NAME = re.compile(r"(?P<cronjob>.+)-\d{8,}")

# Pods in these phases have stopped for good; their IP may already belong to another pod.
FINISHED_PHASES = frozenset({"Succeeded", "Failed"})
# The pod watch's field selector: only pods that have not finished. The API server then sends a
# pod's move to a finished phase as its deletion.
UNFINISHED_PODS = ",".join(f"status.phase!={phase}" for phase in sorted(FINISHED_PHASES))


def is_finished(phase: str) -> bool:
    return phase in FINISHED_PHASES


@dataclass(frozen=True, slots=True)
class PodRecord:
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
    # The pod's controller as "<Kind>/<name>" (Deployment/web, StatefulSet/db, CronJob/nightly;
    # "Pod/<name>" for a bare pod): one interned string shared by all replicas.
    workload: str = ""
    service_account: str = ""

    @property
    def workload_name(self) -> str:
        return self.workload.partition("/")[2] or self.name

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


def _annotations(obj: dict[str, Any]) -> dict[str, str]:
    return (obj.get("metadata") or {}).get("annotations") or {}


def object_key(obj: dict[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return (meta.get("namespace") or "", meta.get("name") or "")


def pod_from_object(obj: dict[str, Any]) -> PodRecord:
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    annotations = meta.get("annotations") or {}
    # Namespaces and node IPs repeat across thousands of pods: share one string for each.
    return PodRecord(
        uid=meta.get("uid") or "",
        namespace=sys.intern(meta.get("namespace") or ""),
        name=meta.get("name") or "",
        ip=status.get("podIP") or "",
        host_ip=sys.intern(status.get("hostIP") or ""),
        phase=sys.intern(status.get("phase") or ""),
        host_network=bool(spec.get("hostNetwork")),
        role=(annotations.get(ROLE_ANNOTATION) or "").strip(),
        external_id=annotations.get(EXTERNAL_ID_ANNOTATION) or "",
        session_name=(annotations.get(SESSION_NAME_ANNOTATION) or "").strip(),
        workload=sys.intern(workload_of(meta)),
        service_account=sys.intern(spec.get("serviceAccountName") or "default"),
    )


def workload_of(meta: dict[str, Any]) -> str:
    """The workload that owns a pod, as "<Kind>/<name>", from its controller owner reference and
    the controllers' naming conventions; "Pod/<name>" when no controller owns it.

    A pod names only its direct owner, so a Deployment is recognised through its ReplicaSet's
    name (<deployment>-<pod-template-hash>) and a CronJob through its Job's name
    (<cronjob>-<minutes since the epoch>). Reading the ReplicaSet or Job themselves would be
    exact, but costs a watch of each kind for what the names already say."""
    owner = next(
        (ref for ref in meta.get("ownerReferences") or () if ref.get("controller")),
        None,
    )
    if owner is None or not owner.get("kind") or not owner.get("name"):
        return f"Pod/{meta.get('name') or ''}"
    kind, name = owner["kind"], owner["name"]
    labels = meta.get("labels") or {}
    if kind == "ReplicaSet":
        template_hash = labels.get(POD_TEMPLATE_HASH_LABEL) or ""
        if template_hash and name.endswith(f"-{template_hash}"):
            return f"Deployment/{name[: -len(template_hash) - 1]}"
    elif kind == "Job":
        match = _CRONJOB_JOB_NAME.fullmatch(name)
        if match:
            return f"CronJob/{match['cronjob']}"
    return f"{kind}/{name}"


def namespace_from_object(obj: dict[str, Any]) -> NamespaceRecord:
    meta = obj.get("metadata") or {}
    permitted = (_annotations(obj).get(PERMITTED_ANNOTATION) or "").strip()
    pattern, error = None, ""
    if permitted:
        try:
            pattern = PermittedPattern(permitted)
        except PatternError as exc:
            error = (
                f"invalid {PERMITTED_ANNOTATION} regular expression, so nothing is permitted: {exc}"
            )
    return NamespaceRecord(
        name=meta.get("name") or "",
        uid=meta.get("uid") or "",
        permitted=permitted,
        pattern=pattern,
        error=error,
    )
