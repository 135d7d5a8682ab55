"""Pods added to the Kubernetes API test server the way most tests want them: on this node, with
an IP of their own unless the test gives one, and their role as an annotation."""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterator
from typing import Any

from tests.support.kubeapi import KubeApiServer
from tests.support.objects import ROLE

# The node the tests' agent runs on, and where a test's gRPC client connects from.
NODE = "127.0.0.1"

# Per API server, so that a module's pods get the same IPs whichever modules ran before it.
_ips: weakref.WeakKeyDictionary[KubeApiServer, Iterator[str]] = weakref.WeakKeyDictionary()


def next_pod_ip(kube: KubeApiServer) -> str:
    """An IP no pod of ``kube`` got from here yet. They are loopback addresses (127.0.1.1,
    127.0.1.2, ...), so a test can also send requests from them as the pod would; tests keep
    127.0.9.x and above for callers that are no pod."""
    if kube not in _ips:
        _ips[kube] = (f"127.0.{n // 250 + 1}.{n % 250 + 1}" for n in itertools.count())
    return next(_ips[kube])


def add_pod(
    kube: KubeApiServer,
    namespace: str,
    name: str,
    role: str | None = None,
    *,
    ip: str | None = None,
    host_ip: str = NODE,
    annotations: dict[str, str] | None = None,
    **fields: Any,
) -> str:
    """Add a running pod with ``role`` (None: no role annotation) and return its IP."""
    ip = ip or next_pod_ip(kube)
    annotations = dict(annotations or {})
    if role is not None:
        annotations[ROLE] = role
    kube.add_pod(namespace, name, ip=ip, host_ip=host_ip, annotations=annotations, **fields)
    return ip
