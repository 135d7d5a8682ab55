"""Tells the server that this node is ready for pods, so that it removes the startup taint.

A new node carries a taint that keeps pods off it until they can be served safely: until this
agent intercepts 169.254.169.254 there, a pod would reach the node's own metadata service and
its role. Only the agent knows when that is so — its DNAT rule verified with ``iptables -C``,
and a snapshot of its node's pods applied, so that it answers for them at once — and only the
server may change the node (the agent holds no Kubernetes permissions). So after each node
stream's first snapshot the agent reports both facts on ``ReportNodeReady``; the server checks
the node is the caller's and removes the taint. Reports repeat after reconnects, harmlessly.
"""

from __future__ import annotations

import asyncio
import logging
import random

import grpc

from agent import metrics
from agent.iptables import IptablesError, MetadataRedirect
from protos import kiam_pb2

log = logging.getLogger(__name__)

_REPORT_SECONDS = 10.0
_BACKOFF_INITIAL = 0.5
_BACKOFF_MAX = 30.0
# The server could not act on the report now (it or the Kubernetes API is unwell): ask again.
_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNKNOWN,
}


class ReadinessReporter:
    """Reports the node ready after each synced node stream (``synced``), in the background."""

    def __init__(
        self,
        stub_of,
        *,
        node_name: str,
        host_ip: str,
        redirect: MetadataRedirect | None,
        backoff_initial: float = _BACKOFF_INITIAL,
    ) -> None:
        self._stub_of = stub_of  # called per attempt: the stub changes on certificate rotation
        self._node_name = node_name
        self._host_ip = host_ip
        self._redirect = redirect
        self._backoff_initial = backoff_initial
        self._task: asyncio.Task | None = None
        # Set once the server has answered a report (whatever it said): for tests and logs.
        self.answered = asyncio.Event()
        self.last_answer: str | None = None
        self._said_unnamed = False

    def synced(self) -> None:
        """A node stream delivered its snapshot and it was applied: report (again)."""
        if not self._node_name:
            if not self._said_unnamed:  # said once, when it matters, not at every reconnect
                self._said_unnamed = True
                log.warning(
                    "no --node-name (NODE_NAME): this agent cannot report its node ready, so a "
                    "startup taint on it stays until removed by hand"
                )
            return
        if self._task is not None and not self._task.done():
            return  # a report is under way; it reads the rule afresh on each attempt
        self._task = asyncio.create_task(self._report(), name="report-node-ready")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _report(self) -> None:
        failures = 0
        while True:
            installed = await self._redirect_installed()
            request = kiam_pb2.NodeReadyReport(
                node_name=self._node_name,
                host_ip=self._host_ip,
                redirect_installed=installed,
                snapshot_applied=True,
            )
            try:
                answer = await self._stub_of().ReportNodeReady(request, timeout=_REPORT_SECONDS)
            except grpc.aio.AioRpcError as error:
                code = error.code()
                metrics.READY_REPORTS.labels(outcome=code.name).inc()
                if code in _RETRYABLE:
                    failures += 1
                    delay = self._backoff(failures)
                    log.warning(
                        "cannot report node %s ready (%s: %s); retrying in %.1fs",
                        self._node_name, code.name, error.details(), delay,
                    )  # fmt: skip
                    await asyncio.sleep(delay)
                    continue
                # A refusal (not this node, rule missing) or a server without the RPC (kiam):
                # asking again would get the same answer; the next reconnect asks anew.
                log.warning(
                    "node %s not reported ready: %s: %s",
                    self._node_name, code.name, error.details(),
                )  # fmt: skip
                self._answered(code.name)
                return
            metrics.READY_REPORTS.labels(outcome=answer.outcome or "OK").inc()
            log.info("reported node %s ready: %s", self._node_name, answer.message)
            self._answered(answer.outcome)
            return

    async def _redirect_installed(self) -> bool:
        if self._redirect is None:
            log.warning(
                "node %s: reporting no DNAT rule (the agent runs without --iptables), so the "
                "server keeps its startup taint",
                self._node_name,
            )
            return False
        try:
            present = await self._redirect.present()
        except IptablesError as error:
            log.error("node %s: cannot verify the DNAT rule: %s", self._node_name, error)
            return False
        if not present:
            log.error(
                "node %s: the DNAT rule is missing: %s", self._node_name, self._redirect.describe()
            )
        return present

    def _answered(self, outcome: str) -> None:
        self.last_answer = outcome
        self.answered.set()

    def _backoff(self, failures: int) -> float:
        ceiling = min(_BACKOFF_MAX, self._backoff_initial * 2 ** (failures - 1))
        return random.uniform(ceiling / 2, ceiling)
