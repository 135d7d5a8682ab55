"""Raw Kubernetes objects as the API server sends them: the one set of builders, used by the
Kubernetes API test server (tests/support/kubeapi.py) and by tests and benchmarks that feed
the registry or the policy directly."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from typing import Any

Object = dict[str, Any]

ROLE = "iam.amazonaws.com/role"
PERMITTED = "iam.amazonaws.com/permitted"


def pod_object(
    namespace: str,
    name: str,
    *,
    ip: str | None = None,
    host_ip: str | None = None,
    phase: str = "Running",
    role: str | None = None,
    annotations: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    host_network: bool = False,
    node_name: str | None = None,
    uid: str | None = None,
) -> Object:
    """A pod; ``role`` is its role annotation, added to ``annotations``. Each call makes a new
    pod, with a uid of its own unless one is given (a pod recreated under the same name is a
    different pod)."""
    metadata: Object = {"name": name, "namespace": namespace}
    if role is not None:
        annotations = {**(annotations or {}), ROLE: role}
    if annotations:
        metadata["annotations"] = dict(annotations)
    if labels:
        metadata["labels"] = dict(labels)
    metadata["uid"] = uid or str(uuid.uuid4())
    spec: Object = {"containers": [{"name": "app", "image": "busybox"}]}
    if node_name:
        spec["nodeName"] = node_name
    if host_network:
        spec["hostNetwork"] = True
    status: Object = {"phase": phase}
    if host_ip:
        status["hostIP"] = host_ip
        status["hostIPs"] = [{"ip": host_ip}]
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    return {"metadata": metadata, "spec": spec, "status": status}


def replica_pod_object(
    namespace: str, deployment: str, n: int, *, template_hash: str, **pod: Any
) -> Object:
    """Replica ``n`` of Deployment ``deployment`` as its ReplicaSet
    (``<deployment>-<template_hash>``) makes it: named after the ReplicaSet, labelled with the
    template hash, the ReplicaSet its controller owner; ``pod`` as for pod_object."""
    replica_set = f"{deployment}-{template_hash}"
    labels = {**(pod.pop("labels", None) or {}), "pod-template-hash": template_hash}
    obj = pod_object(namespace, f"{replica_set}-{n:05d}", labels=labels, **pod)
    obj["metadata"]["ownerReferences"] = [
        {
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "name": replica_set,
            "uid": f"rs-{deployment}",
            "controller": True,
        }
    ]
    return obj


def namespace_object(
    name: str,
    permitted: str | None = None,
    *,
    annotations: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
) -> Object:
    """A namespace; ``permitted`` is its permitted-roles annotation, added to ``annotations``."""
    if permitted is not None:
        annotations = {**(annotations or {}), PERMITTED: permitted}
    metadata: Object = {"name": name}
    if annotations:
        metadata["annotations"] = dict(annotations)
    if labels:
        metadata["labels"] = dict(labels)
    return {
        "metadata": metadata,
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    }


def node_object(
    name: str,
    *,
    internal_ip: str | None = None,
    taints: Iterable[Mapping[str, str]] = (),
    labels: Mapping[str, str] | None = None,
) -> Object:
    metadata: Object = {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}}
    spec: Object = {}
    if taints:
        spec["taints"] = [dict(taint) for taint in taints]
    addresses = [{"type": "Hostname", "address": name}]
    if internal_ip:
        addresses.insert(0, {"type": "InternalIP", "address": internal_ip})
    return {"metadata": metadata, "spec": spec, "status": {"addresses": addresses}}
