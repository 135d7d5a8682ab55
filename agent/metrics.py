"""Prometheus metrics of the agent."""

from __future__ import annotations

import time
import weakref
from collections.abc import Mapping
from typing import Protocol

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from certs.tls import TlsFiles, expiry_times
from runtime.request_metrics import RequestMetrics

REQUESTS = RequestMetrics(
    "podiam_agent_requests_total",
    "Metadata API requests answered, by route and HTTP status.",
    "podiam_agent_request_duration_seconds",
    "Time to answer a metadata API request, by route.",
    labels=("route", "status"),
    buckets=(0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
REFUSALS = Counter(
    "podiam_agent_refusals_total",
    "Requests refused, by reason (unknown-pod, denied, wrong-role, blocked-path, bad-token, ...).",
    ["reason"],
)
STREAM_CONNECTED = Gauge(
    "podiam_agent_node_stream_connected",
    "1 while a node stream from a server is connected and synced.",
)
STREAM_RECONNECTS = Counter(
    "podiam_agent_node_stream_reconnects_total",
    "Node stream connection attempts that failed or ended.",
)
STREAM_HANDOVERS = Counter(
    "podiam_agent_node_stream_handovers_total",
    "Node streams moved to a new connection before the server closed the old one.",
)
PODS_KNOWN = Gauge(
    "podiam_agent_pods_known",
    "Pod IPs of this node known from the node stream.",
)
FALLBACK_CALLS = Counter(
    "podiam_agent_fallback_calls_total",
    "Unary calls to the server when the node stream could not answer, by RPC and outcome.",
    ["rpc", "outcome"],
)
POD_WAITS = Counter(
    "podiam_agent_pod_waits_total",
    "Waits for a pod the node stream did not know yet, by outcome (arrived, timeout).",
    ["outcome"],
)
READY_REPORTS = Counter(
    "podiam_agent_ready_reports_total",
    "Reports to the server that this node is ready (DNAT rule installed, snapshot applied), "
    "by the server's answer (scheduled, absent, disabled) or the gRPC status name.",
    ["outcome"],
)
MODE = Gauge(
    "podiam_agent_mode",
    "1 for the agent's current mode: live (two node streams), one-stream, stale (no stream; "
    "serving cached credentials within the stale rules) or none.",
    ["mode"],
)
STREAMS_LIVE = Gauge(
    "podiam_agent_node_streams_live",
    "Node streams, from distinct server replicas, that are connected and synced.",
)
ROUTE_DROPS = Counter(
    "podiam_agent_route_drops_total",
    "Pod entries no longer served from memory because the pod IP's host route vanished or "
    "moved to another interface.",
)
STALE_ANSWERS = Counter(
    "podiam_agent_stale_answers_total",
    "Credentials answered from memory while no node stream was live.",
)
LIMITED = Counter(
    "podiam_agent_listener_limited_total",
    "Times a pod hit one of the metadata listener's limits, by limit: connections-per-ip, "
    "connections, header-timeout, keepalive-timeout, header-bytes, body-bytes, pod-rate, "
    "malformed, pipelined, unread, accept-resources (accepts paused: out of descriptors).",
    ["limit"],
)
CONNECTIONS = Gauge(
    "podiam_agent_listener_connections",
    "Pod connections open on the agent's listeners (metadata API, token-bound credentials).",
)


class _Expiring(Protocol):
    expires: float  # seconds since the epoch


class _HeldCredentials(Protocol):
    credentials: Mapping[str, _Expiring]


# SDKs treat credentials with less than about 25 minutes left as expiring; the server refreshes
# with 30 to 35 minutes left, so an agent holding such credentials means refreshes are failing.
EXPIRING_WITHIN = 30 * 60


class HeldCredentials:
    """``podiam_agent_credentials_expiring`` and
    ``podiam_agent_certificate_expiry_timestamp_seconds``,
    worked out at each scrape from what the agent holds (rendered on the event loop, like
    everything the agent counts, so the state's dictionaries are read where they change)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self._states: weakref.WeakSet = weakref.WeakSet()
        self._files: dict[str, TlsFiles] = {}
        registry.register(self)

    def watch(self, state: _HeldCredentials, files: TlsFiles | None = None) -> None:
        self._states.add(state)
        if files is not None:
            self._files["agent"] = files

    def describe(self) -> list[Metric]:
        return self._families()

    def collect(self) -> list[Metric]:
        expiring, certificates = self._families()
        soon = time.time() + EXPIRING_WITHIN
        expiring.add_metric(
            [],
            sum(
                1
                for state in list(self._states)
                for held in state.credentials.values()
                if held.expires < soon
            ),
        )
        for side, files in self._files.items():
            for certificate, moment in expiry_times(files, side=side).items():
                certificates.add_metric([certificate], moment)
        return [expiring, certificates]

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(
                "podiam_agent_credentials_expiring",
                "Identities whose credentials this agent holds with under 30 minutes left (it "
                "serves them while no fresher ones come): 0 unless the server's refreshes fail.",
            ),
            GaugeMetricFamily(
                "podiam_agent_certificate_expiry_timestamp_seconds",
                "When a TLS certificate expires (seconds since the epoch): the agent's own "
                "client certificate (certificate=agent), and the latest-expiring CA of the "
                "bundle the server's certificate must chain to (certificate=ca).",
                labels=["certificate"],
            ),
        ]


HELD = HeldCredentials()
