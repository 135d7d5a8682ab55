"""Kubernetes Events for denials, so that `kubectl describe pod` says why a pod got no
credentials, `kubectl describe namespace` why its iam.amazonaws.com/permitted permits nothing,
and `kubectl describe node` when podiam removed a node's startup taint.

Recording never blocks the caller: denials are queued and posted by one background task.
Each (pod, reason) pair, and each (namespace, reason, pattern), gets a deterministic Event name,
so repeats — from this replica, another replica, or after a restart — are recognised by the API
server (409 Conflict) instead of piling up; an in-memory set spares the API server the repeats
this replica has already seen.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from server import metrics
from server.pods import NamespaceRecord, PodRecord
from server.policy import Denial

log = logging.getLogger(__name__)

COMPONENT = "podiam-server"
# Event timestamps are Kubernetes times (metav1.Time: RFC 3339, UTC, whole seconds), not the
# metadata API's: the two formats look alike today but belong to different contracts.
_KUBE_TIME = "%Y-%m-%dT%H:%M:%SZ"
# Nodes are cluster-scoped; their Events go in "default", as the kubelet's do.
NODE_EVENTS_NAMESPACE = "default"


@dataclass(frozen=True, slots=True)
class _Subject:
    """The object an Event is about, and what makes a repeat of the same Event."""

    kind: str
    namespace: str  # where the Event is stored: the pod's namespace, or the namespace itself
    name: str
    uid: str
    identity: str  # hashed into the Event's name

    @property
    def label(self) -> str:
        if self.kind == "Pod":
            return f"pod {self.namespace}/{self.name}"
        return f"namespace {self.name}"


class EventRecorder:
    def __init__(
        self, api: client.ApiClient, *, queue_size: int = 1000, remember: int = 10_000
    ) -> None:
        self._core = client.CoreV1Api(api)
        self._queue: asyncio.Queue[tuple[_Subject, Denial]] = asyncio.Queue(queue_size)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._remember = remember
        self._instance = socket.gethostname()
        self._task: asyncio.Task | None = None

    def record(self, pod: PodRecord, denial: Denial) -> None:
        subject = _Subject("Pod", pod.namespace, pod.name, pod.uid, f"{pod.uid}/{denial.reason}")
        self._enqueue(subject, denial)

    def record_namespace(self, namespace: NamespaceRecord, denial: Denial) -> None:
        # The pattern is part of the identity: a new unusable pattern deserves its own Event.
        identity = f"{namespace.uid}/{denial.reason}/{namespace.permitted}"
        subject = _Subject("Namespace", namespace.name, namespace.name, namespace.uid, identity)
        self._enqueue(subject, denial)

    def _enqueue(self, subject: _Subject, denial: Denial) -> None:
        key = hashlib.sha256(subject.identity.encode()).hexdigest()[:12]
        if key in self._seen:
            self._seen.move_to_end(key)
            metrics.KUBE_EVENTS.labels(result="suppressed").inc()
            return
        try:
            self._queue.put_nowait((subject, denial))
        except asyncio.QueueFull:
            metrics.KUBE_EVENTS.labels(result="dropped").inc()
            return
        self._seen[key] = None
        if len(self._seen) > self._remember:
            self._seen.popitem(last=False)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-recorder")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def drain(self) -> None:
        """Wait until every queued Event has been posted (for tests and shutdown)."""
        await self._queue.join()

    async def _run(self) -> None:
        while True:
            subject, denial = await self._queue.get()
            try:
                await self._post(subject, denial)
            except Exception as error:  # an Event is best effort; never stop recording
                metrics.KUBE_EVENTS.labels(result="failed").inc()
                log.warning("cannot record Event for %s: %s", subject.label, error)
            finally:
                self._queue.task_done()

    async def node_event(self, node: dict[str, Any], reason: str, message: str) -> None:
        """Post a Normal Event about ``node`` now (the caller is already off the hot path).
        One Event per node and reason: a repeat after a restart is recognised as 409."""
        metadata = node.get("metadata") or {}
        name, uid = metadata.get("name", ""), metadata.get("uid", "")
        suffix = hashlib.sha256(f"{uid}/{reason}".encode()).hexdigest()[:12]
        body = self._event(
            name=f"{name}.podiam-{suffix}",
            namespace=NODE_EVENTS_NAMESPACE,
            involved={"apiVersion": "v1", "kind": "Node", "name": name, "uid": uid},
            reason=reason,
            message=message,
            event_type="Normal",
        )
        if await self._create(NODE_EVENTS_NAMESPACE, body):
            log.info("recorded Event %s on node %s", reason, name)

    async def _post(self, subject: _Subject, denial: Denial) -> None:
        suffix = hashlib.sha256(subject.identity.encode()).hexdigest()[:12]
        involved = {"apiVersion": "v1", "kind": subject.kind, "name": subject.name}
        if subject.kind == "Pod":  # a Namespace is cluster-scoped
            involved["namespace"] = subject.namespace
        involved["uid"] = subject.uid
        body = self._event(
            name=f"{subject.name}.podiam-{suffix}",
            namespace=subject.namespace,
            involved=involved,
            reason=denial.reason.event_reason,
            message=denial.message,
            event_type="Warning",
        )
        if await self._create(subject.namespace, body):
            log.info("recorded Event %s on %s", denial.reason.event_reason, subject.label)

    def _event(
        self,
        *,
        name: str,
        namespace: str,
        involved: dict,
        reason: str,
        message: str,
        event_type: str,
    ) -> dict[str, Any]:
        now = datetime.now(UTC).strftime(_KUBE_TIME)
        return {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": namespace},
            "involvedObject": involved,
            "reason": reason,
            "message": message,
            "type": event_type,
            "count": 1,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": self._instance,
        }

    async def _create(self, namespace: str, body: dict[str, Any]) -> bool:
        """Create the Event; False when it exists already (409)."""
        try:
            await self._core.create_namespaced_event(namespace, body)
        except ApiException as error:
            if error.status != 409:
                raise
            metrics.KUBE_EVENTS.labels(result="exists").inc()
            return False
        metrics.KUBE_EVENTS.labels(result="created").inc()
        return True
