"""Removes a new node's startup taint once that node's agent reports its interception in place.

Between a node joining the cluster and its podiam agent installing the DNAT rule, a pod on it
that asks 169.254.169.254 reaches the real metadata service: the node's role. Operators close
that window by putting a taint on their node groups (default ``podiam.io/agent-not-ready``,
NoExecute) that no workload tolerates; this module takes it off, node by node, when the node's
own agent reports that its rule is installed and its node snapshot applied. The agent holds no
Kubernetes permissions, so the server does it, and it needs exactly ``nodes: get, patch``.

The report is checked against the node itself: one of the node's addresses must be the
caller's (its peer address, as for node binding), so agent A cannot clear node B's taint. Only
the configured key is removed, whatever its value or effect; other taints are left as they are.
The patch is a JSON patch whose ``test`` op repeats the taints as read, so a concurrent change
by another controller (the cloud controller removing ``uninitialized``, say) makes the API
server refuse ours (422) instead of our write undoing theirs; we read again and retry. API
errors are retried with capped backoff in a background task, so an agent's RPC never waits on
them. This would be unnecessary if Kubernetes had readiness gates for nodes.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from kubernetes_asyncio.client import ApiClient, CoreV1Api

from server import metrics
from server.kube_status import status_message

log = logging.getLogger(__name__)

DEFAULT_KEY = "podiam.io/agent-not-ready"
REASON_REMOVED = "PodiamAgentReady"
_REQUEST_TIMEOUT = 10.0
# The read made while an agent waits for its answer: well inside the agent's own deadline, so
# a slow API server is reported as UNAVAILABLE (and retried) rather than timing out the call.
_READ_IN_RPC_TIMEOUT = 4.0

# Posts a Normal Event about a node: (node object, reason, message).
NodeEventSink = Callable[[dict[str, Any], str, str], Awaitable[None]]


class Outcome(enum.Enum):
    SCHEDULED = "scheduled"  # the taint is there; a removal is under way
    ABSENT = "absent"  # the node carries no startup taint: nothing to do


class NodeReportError(Exception):
    """The report cannot be acted on; ``kind`` says why, for the gRPC status."""

    NOT_FOUND = "not_found"
    NOT_THIS_NODE = "not_this_node"
    UNAVAILABLE = "unavailable"

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class _Conflict(Exception):
    """The node changed between our read and our patch (409, or 422 from the ``test`` op)."""


class _Gone(Exception):
    """The node was deleted."""


class _ApiError(Exception):
    """The API server failed or could not be reached; worth retrying later."""


class StartupTaintRemover:
    """Removes the taint ``key`` from nodes whose agents report ready."""

    def __init__(
        self,
        api: ApiClient,
        *,
        key: str = DEFAULT_KEY,
        on_removed: NodeEventSink | None = None,
        attempts: int = 8,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        self._core = CoreV1Api(api)
        self.key = key
        self._on_removed = on_removed
        self._attempts = attempts
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._pending: dict[str, asyncio.Task] = {}

    async def node_ready(self, node_name: str, *, address: str) -> Outcome:
        """An agent at ``address`` reports node ``node_name`` ready. Checks that the node has
        that address, then schedules the removal if the taint is there; raises
        NodeReportError when the node is missing, not the caller's, or cannot be read."""
        try:
            node = await self._get(node_name, seconds=_READ_IN_RPC_TIMEOUT)
        except _Gone:
            raise NodeReportError(
                NodeReportError.NOT_FOUND, f"node {node_name} does not exist"
            ) from None
        except _ApiError as error:
            raise NodeReportError(
                NodeReportError.UNAVAILABLE, f"cannot read node {node_name}: {error}"
            ) from error
        if address not in node_addresses(node):
            raise NodeReportError(
                NodeReportError.NOT_THIS_NODE,
                f"node {node_name} does not have the address {address}",
            )
        if not self._tainted(node):
            metrics.STARTUP_TAINT_REMOVALS.labels(outcome="absent").inc()
            log.debug("node %s reported ready and carries no %s taint", node_name, self.key)
            return Outcome.ABSENT
        if node_name not in self._pending:
            task = asyncio.create_task(self._remove(node_name, node), name=f"untaint-{node_name}")
            self._pending[node_name] = task
            task.add_done_callback(lambda done: self._forget(node_name, done))
        return Outcome.SCHEDULED

    def _forget(self, name: str, task: asyncio.Task) -> None:
        if self._pending.get(name) is task:  # not a newer removal for the same node
            del self._pending[name]

    async def drain(self) -> None:
        """Wait for every scheduled removal to finish (tests, shutdown)."""
        while self._pending:
            await asyncio.gather(*list(self._pending.values()), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._pending.values()):
            task.cancel()
        await asyncio.gather(*list(self._pending.values()), return_exceptions=True)

    # --- the removal ------------------------------------------------------------------------

    async def _remove(self, name: str, node: dict[str, Any] | None) -> None:
        failures = 0
        while True:
            try:
                if node is None:
                    node = await self._get(name)
                if not self._tainted(node):
                    # Someone (or a previous attempt whose answer we lost) removed it already.
                    metrics.STARTUP_TAINT_REMOVALS.labels(outcome="absent").inc()
                    log.info("node %s: the %s taint is already gone", name, self.key)
                    return
                patched = await self._patch(name, node)
            except _Gone:
                metrics.STARTUP_TAINT_REMOVALS.labels(outcome="node_gone").inc()
                log.info("node %s was deleted before its %s taint was removed", name, self.key)
                return
            except _Conflict as conflict:
                # Not a failure: read the node again and retry at once, but bound the loop.
                metrics.STARTUP_TAINT_REMOVALS.labels(outcome="conflict").inc()
                log.info(
                    "node %s changed while removing %s (%s); reading again",
                    name,
                    self.key,
                    conflict,
                )
                failures += 1
                delay = 0.0
            except _ApiError as error:
                metrics.STARTUP_TAINT_REMOVALS.labels(outcome="error").inc()
                failures += 1
                delay = self._backoff(failures)
                log.warning(
                    "node %s: cannot remove the %s taint (%s); retrying in %.1fs",
                    name, self.key, error, delay,
                )  # fmt: skip
            else:
                metrics.STARTUP_TAINT_REMOVALS.labels(outcome="removed").inc()
                log.info("node %s: removed the %s taint; its agent is ready", name, self.key)
                await self._record(patched)
                return
            if failures >= self._attempts:
                # The agent reports again when it reconnects, so this node is not lost for good.
                metrics.STARTUP_TAINT_REMOVALS.labels(outcome="gave_up").inc()
                log.error(
                    "node %s: gave up removing the %s taint after %d attempts",
                    name, self.key, failures,
                )  # fmt: skip
                return
            node = None
            await asyncio.sleep(delay)

    def _tainted(self, node: dict[str, Any]) -> bool:
        return any(taint.get("key") == self.key for taint in _taints(node))

    async def _get(self, name: str, *, seconds: float = _REQUEST_TIMEOUT) -> dict[str, Any]:
        return await self._call(
            self._core.read_node(name, _preload_content=False, _request_timeout=seconds)
        )

    async def _patch(self, name: str, node: dict[str, Any]) -> dict[str, Any]:
        taints = _taints(node)
        keep = [taint for taint in taints if taint.get("key") != self.key]
        # The test op makes the API server apply our change only to the taints we read; an
        # empty list is removed rather than written, as the API server would store it.
        patch: list[dict[str, Any]] = [{"op": "test", "path": "/spec/taints", "value": taints}]
        if keep:
            patch.append({"op": "replace", "path": "/spec/taints", "value": keep})
        else:
            patch.append({"op": "remove", "path": "/spec/taints"})
        return await self._call(
            self._core.patch_node(
                name,
                patch,
                _content_type="application/json-patch+json",
                _preload_content=False,
                _request_timeout=_REQUEST_TIMEOUT,
            )
        )

    async def _call(self, request: Awaitable[Any]) -> dict[str, Any]:
        try:
            response = await request
            try:
                body = await response.read()
            finally:
                response.release()
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            raise _ApiError(str(error) or type(error).__name__) from error
        status = response.status
        if status == 404:
            raise _Gone()
        if status in (409, 422):
            raise _Conflict(f"HTTP {status}: {status_message(body)}")
        if not 200 <= status < 300:
            raise _ApiError(f"HTTP {status}: {status_message(body)}")
        try:
            obj = json.loads(body)
        except ValueError as error:
            raise _ApiError("unreadable answer from the API server") from error
        if not isinstance(obj, dict):
            raise _ApiError("unreadable answer from the API server")
        return obj

    async def _record(self, node: dict[str, Any]) -> None:
        if self._on_removed is None:
            return
        name = (node.get("metadata") or {}).get("name", "?")
        try:
            await self._on_removed(
                node, REASON_REMOVED, f"podiam agent ready: removed the {self.key} taint"
            )
        except Exception as error:  # an Event is best effort
            log.warning("cannot record Event on node %s: %s", name, error)

    def _backoff(self, failures: int) -> float:
        ceiling = min(self._backoff_max, self._backoff_initial * 2 ** (failures - 1))
        return random.uniform(ceiling / 2, ceiling)


def node_addresses(node: dict[str, Any]) -> set[str]:
    """The node's InternalIP addresses, as the kubelet reports them: an agent (hostNetwork)
    reaches the server from one of them, the same that pods see as their status.hostIP."""
    addresses = (node.get("status") or {}).get("addresses") or []
    return {
        str(entry.get("address"))
        for entry in addresses
        if isinstance(entry, dict) and entry.get("type") == "InternalIP"
    }


def _taints(node: dict[str, Any]) -> list[dict[str, Any]]:
    taints = (node.get("spec") or {}).get("taints") or []
    return [taint for taint in taints if isinstance(taint, dict)]
