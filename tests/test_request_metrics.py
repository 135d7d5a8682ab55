"""The server's lock-free request metrics read exactly as prometheus_client's own Counter and
Histogram would, so a dashboard or alert cannot tell them apart."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from runtime.request_metrics import RequestMetrics, SecondsHistogram

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
ANSWERS = [
    ("GetPodCredentials", "OK", 0.0004),
    ("GetPodCredentials", "OK", 0.001),  # on a bound: counted in that bucket
    ("GetPodCredentials", "NOT_FOUND", 0.02),
    ("GetPodRole", "OK", 7.0),  # above every bound: +Inf only
    ("GetPodCredentials", "OK", 0.3),
]


def _exposed(registry: CollectorRegistry) -> str:
    text = generate_latest(registry).decode()
    # Creation times differ by the microseconds between the two objects.
    return re.sub(r"(_created(\{[^}]*\})?) \S+", r"\1 T", text)


def test_server_request_metrics_are_exposed_as_a_prometheus_counter_and_histogram_would_be():
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    metrics = RequestMetrics(
        "podiam_server_requests", "Requests.", "podiam_server_request_duration_seconds",
        "Time.", labels=("rpc", "outcome"), buckets=BUCKETS, registry=ours,
    )  # fmt: skip
    counter = Counter("podiam_server_requests_total", "Requests.", ["rpc", "outcome"],
                      registry=theirs)  # fmt: skip
    histogram = Histogram("podiam_server_request_duration_seconds", "Time.", ["rpc"],
                          buckets=BUCKETS, registry=theirs)  # fmt: skip
    for rpc, outcome, seconds in ANSWERS:
        metrics.count(rpc, outcome, seconds)
        counter.labels(rpc=rpc, outcome=outcome).inc()
        histogram.labels(rpc=rpc).observe(seconds)
    # A stream is counted but not timed.
    metrics.tally("WatchNode", "OK")
    counter.labels(rpc="WatchNode", outcome="OK").inc()

    assert _exposed(ours) == _exposed(theirs)
    assert 'podiam_server_requests_total{outcome="OK",rpc="GetPodCredentials"} 3.0' in (
        _exposed(ours)
    )


def test_a_seconds_histogram_reads_as_a_prometheus_histogram_would_labelled_or_not():
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    plain = SecondsHistogram("podiam_plain_seconds", "Time.", buckets=BUCKETS, registry=ours)
    by_kind = SecondsHistogram(
        "podiam_kind_seconds", "Time.", buckets=BUCKETS, label=("kind", ("a", "b", "c")),
        registry=ours,
    )  # fmt: skip
    their_plain = Histogram("podiam_plain_seconds", "Time.", buckets=BUCKETS, registry=theirs)
    their_kind = Histogram("podiam_kind_seconds", "Time.", ["kind"], buckets=BUCKETS,
                           registry=theirs)  # fmt: skip
    for kind in "abc":
        their_kind.labels(kind=kind)  # every series from the start, as ours
    for index, (_, _, seconds) in enumerate(ANSWERS):
        plain.observe(seconds)
        their_plain.observe(seconds)
        by_kind.observe(seconds, index % 2)  # "c" is never observed: exposed at 0
        their_kind.labels(kind="ab"[index % 2]).observe(seconds)

    assert _exposed(ours) == _exposed(theirs)
    assert 'podiam_kind_seconds_count{kind="c"} 0.0' in _exposed(ours)
