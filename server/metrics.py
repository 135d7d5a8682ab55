"""Prometheus metrics of the server. One place, so names stay consistent and documented."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY

from certs.tls import TlsFiles, expiry_times
from runtime.request_metrics import RequestMetrics, SecondsHistogram

# Counted without locks (runtime/request_metrics.py): prometheus_client's Counter and Histogram
# were a fifth of podiam's own work per GetPodCredentials. ``count`` for unary RPCs
# (timed), ``tally`` for node streams.
REQUESTS = RequestMetrics(
    "podiam_server_requests",
    "gRPC requests answered, by RPC and outcome (gRPC status code name).",
    "podiam_server_request_duration_seconds",
    "Time to answer a unary gRPC request.",
    labels=("rpc", "outcome"),
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
DENIALS = Counter(
    "podiam_server_denials_total",
    "Credential or role requests refused, by reason.",
    ["reason"],
)
STS_CALLS = Counter(
    "podiam_sts_assume_role_total",
    "AssumeRole calls made to STS, by outcome (success or the AWS error code).",
    ["outcome"],
)
STS_SECONDS = Histogram(
    "podiam_sts_assume_role_duration_seconds",
    "Latency of AssumeRole calls to STS.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
STS_ERRORS = Counter(
    "podiam_sts_errors_total",
    "AssumeRole calls that failed, by AWS error code.",
    ["code"],
)
CACHE_SIZE = Gauge(
    "podiam_credentials_cache_size",
    "Role identities with credentials held in the cache.",
)
CACHE_HITS = Counter(
    "podiam_credentials_cache_hits_total",
    "Credential lookups answered from the cache.",
)
CACHE_MISSES = Counter(
    "podiam_credentials_cache_misses_total",
    "Credential lookups that had to wait for STS.",
)
CACHE_REFRESHES = Counter(
    "podiam_credentials_refreshes_total",
    "Background refreshes of cached credentials, by outcome.",
    ["outcome"],
)
PODS_INDEXED = Gauge(
    "podiam_pods_indexed",
    "Pods held in the server's index (active and inactive).",
)
NAMESPACES_INDEXED = Gauge(
    "podiam_namespaces_indexed",
    "Namespaces held in the server's index.",
)
NAMESPACES_INVALID_PERMITTED = Gauge(
    "podiam_namespaces_invalid_permitted",
    "Namespaces whose iam.amazonaws.com/permitted RE2 cannot compile, so they permit nothing.",
)
WATCH_RESTARTS = Counter(
    "podiam_kube_watch_restarts_total",
    "Kubernetes watches restarted, by resource and reason (ended, gone, error).",
    ["resource", "reason"],
)
WATCH_EVENTS = Counter(
    "podiam_kube_watch_events_total",
    "Kubernetes watch events processed, by resource and type.",
    ["resource", "type"],
)
NODE_STREAMS = Gauge(
    "podiam_node_streams",
    "Agents currently connected to the node stream.",
)
KUBE_EVENTS = Counter(
    "podiam_kube_events_total",
    "Kubernetes Events about denials, by result (created, exists, suppressed, dropped, failed).",
    ["result"],
)
STARTUP_TAINT_REMOVALS = Counter(
    "podiam_startup_taint_removals_total",
    "Agent readiness reports and startup-taint removals, by outcome (removed, absent, "
    "conflict, error, gave_up, node_gone, refused, not_ready).",
    ["outcome"],
)
STS_BUDGET_WAIT_SECONDS = Histogram(
    "podiam_sts_budget_wait_seconds",
    "Time an AssumeRole waited for the STS rate budget (--sts-qps), by priority (first: no valid "
    "credentials held; refresh).",
    ["priority"],
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
STS_BUDGET_QUEUE = Gauge(
    "podiam_sts_budget_queue",
    "AssumeRole calls waiting for the STS rate budget, by priority.",
    ["priority"],
)
STS_THROTTLED = Counter(
    "podiam_sts_throttled_total",
    "AssumeRole answers that said STS is throttling (Throttling, RequestLimitExceeded, ...); "
    "each pauses the rate budget.",
)
WEBHOOK_REVIEWS = Counter(
    "podiam_webhook_reviews_total",
    "AdmissionReviews answered by the token-credentials webhook, by outcome (patched, "
    "unchanged, bad-request).",
    ["outcome"],
)
# Observed once per new pod served, on the node streams' path: counted without locks too.
POD_FIRST_CREDENTIALS = SecondsHistogram(
    "podiam_pod_first_credentials_seconds",
    "Time from the server first seeing a new pod active and permitted a role to its credentials "
    "first going out to its node's agent or to the pod.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
SYNCED = Gauge(
    "podiam_server_synced",
    "1 once the first full list of pods and namespaces is done (gRPC is served only then).",
)


class CertificateExpiry:
    """``podiam_server_certificate_expiry_timestamp_seconds{certificate}``: when the server's TLS
    certificate and the latest-expiring CA it trusts expire. Read from the files at each scrape,
    so a rotation shows at once. (The agent's twin is ``podiam_agent_…``: one name per program,
    so that both can run in one process, as in the tests and the demo.)"""

    def __init__(self, registry=REGISTRY) -> None:
        self._files: dict[str, TlsFiles] = {}
        registry.register(self)

    def watch(self, side: str, files: TlsFiles) -> None:
        self._files[side] = files

    def describe(self):
        return [self._family()]

    def collect(self):
        family = self._family()
        for side, files in list(self._files.items()):
            for certificate, moment in expiry_times(files, side=side).items():
                family.add_metric([certificate], moment)
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "podiam_server_certificate_expiry_timestamp_seconds",
            "When a TLS certificate expires (seconds since the epoch): the server's own "
            "(certificate=server), and the latest-expiring CA of the bundle agents' "
            "certificates must chain to (certificate=ca).",
            labels=["certificate"],
        )


CERTIFICATE_EXPIRY = CertificateExpiry()
