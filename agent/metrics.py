"""Prometheus metrics of the agent."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "podiam_agent_requests_total",
    "Metadata API requests answered, by route and HTTP status.",
    ["route", "status"],
)
REQUEST_SECONDS = Histogram(
    "podiam_agent_request_duration_seconds",
    "Time to answer a metadata API request, by route.",
    ["route"],
    buckets=(0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
REFUSALS = Counter(
    "podiam_agent_refusals_total",
    "Requests refused, by reason (unknown-pod, denied, wrong-role, blocked-path, bad-token, ...).",
    ["reason"],
)
STREAM_CONNECTED = Gauge(
    "podiam_agent_node_stream_connected",
    "1 while the node stream from the server is connected and synced.",
)
STREAM_RECONNECTS = Counter(
    "podiam_agent_node_stream_reconnects_total",
    "Node stream connection attempts that failed or ended.",
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
