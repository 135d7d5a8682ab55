"""Raw Kubernetes objects as the API server sends them, for tests that feed the registry."""

from __future__ import annotations

import uuid
from typing import Any


def pod_object(
    namespace: str,
    name: str,
    *,
    ip: str = "10.1.0.10",
    host_ip: str = "127.0.0.1",
    phase: str = "Running",
    role: str | None = None,
    host_network: bool = False,
    annotations: dict[str, str] | None = None,
    uid: str | None = None,
) -> dict[str, Any]:
    all_annotations = dict(annotations or {})
    if role is not None:
        all_annotations["iam.amazonaws.com/role"] = role
    return {
        "metadata": {
            "namespace": namespace,
            "name": name,
            "uid": uid or str(uuid.uuid4()),
            "annotations": all_annotations,
        },
        "spec": {"hostNetwork": host_network},
        "status": {"phase": phase, "podIP": ip, "hostIP": host_ip},
    }


def namespace_object(name: str, permitted: str | None = None) -> dict[str, Any]:
    annotations = {} if permitted is None else {"iam.amazonaws.com/permitted": permitted}
    return {"metadata": {"name": name, "annotations": annotations}}
