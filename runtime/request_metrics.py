"""Request counters and duration histograms kept as plain numbers, for the agent's and the
server's hot paths: every request counts into them.

prometheus_client's Counter and Histogram take a lock and make several calls per update: four
lock acquisitions per GetPodCredentials (a fifth of the server's own work in it, cProfile) and a
third of the agent's own time on a request answered from memory. Each program counts on its
event loop's thread alone, so there is one writer, and a scrape (on the loop or on
prometheus_client's thread) only reads numbers that the GIL keeps whole. The collector exposes
them exactly as a Counter ``<name>_total{first,second}`` and a Histogram ``<seconds>{first}``
would be: same names, help, labels, buckets and ``_created`` samples.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client import metrics as metrics_module
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.utils import INF, floatToGoString


class RequestMetrics:
    """``<name>_total{first,second}`` (each request, by two labels such as route and status) and
    ``<seconds>{first}`` (the time each took, by the first label)."""

    def __init__(
        self,
        name: str,
        help_text: str,
        seconds: str,
        seconds_help: str,
        *,
        labels: tuple[str, str],
        buckets: Sequence[float],
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self._name, self._help = name.removesuffix("_total"), help_text
        self._seconds, self._seconds_help = seconds, seconds_help
        self._labels = labels
        self._bounds = (*sorted(buckets), INF)
        self._bound_labels = tuple(floatToGoString(bound) for bound in self._bounds)
        self._counts: dict[tuple[object, object], _Count] = {}
        self._durations: dict[object, Durations] = {}
        registry.register(self)

    def count(self, first: object, second: object, seconds: float) -> None:
        """One request, and how long it took."""
        self.tally(first, second)
        durations = self._durations.get(first)
        if durations is None:
            durations = self._durations[first] = Durations(time.time(), len(self._bounds))
        # The first bucket whose bound is at least ``seconds`` (the last is +Inf).
        durations.buckets[bisect_left(self._bounds, seconds)] += 1
        durations.sum += seconds

    def tally(self, first: object, second: object) -> None:
        """One request, untimed (a stream, say, which has no time to answer)."""
        count = self._counts.get((first, second))
        if count is None:
            count = self._counts[(first, second)] = _Count(time.time())
        count.value += 1

    def describe(self) -> list[Metric]:
        return [
            CounterMetricFamily(self._name, self._help, labels=list(self._labels)),
            Metric(self._seconds, self._seconds_help, "histogram"),
        ]

    def collect(self) -> list[Metric]:
        created = metrics_module._use_created
        requests = CounterMetricFamily(self._name, self._help, labels=list(self._labels))
        for (first, second), count in list(self._counts.items()):
            requests.add_metric(
                [str(first), str(second)],
                count.value,
                created=count.created if created else None,
            )
        seconds = Metric(self._seconds, self._seconds_help, "histogram")
        label = self._labels[0]
        for first, durations in list(self._durations.items()):
            add_histogram(seconds, {label: str(first)}, self._bound_labels, durations)
        return [requests, seconds]


class SecondsHistogram:
    """A Histogram counted as ``RequestMetrics`` counts: ``observe`` from one thread at a time
    (or from inside the garbage collector, which holds the GIL), exposed as prometheus_client's
    Histogram would be. Unlabelled, or with one label whose values are all known at the start
    (every series is then exposed from the start, a dashboard sees 0 rather than nothing)."""

    def __init__(
        self,
        name: str,
        help_text: str,
        *,
        buckets: Sequence[float],
        label: tuple[str, Sequence[str]] | None = None,
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self._name, self._help = name, help_text
        self._bounds = (*sorted(buckets), INF)
        self._bound_labels = tuple(floatToGoString(bound) for bound in self._bounds)
        now = time.time()
        if label is None:
            self._labels: tuple[dict[str, str], ...] = ({},)
        else:
            key, values = label
            self._labels = tuple({key: value} for value in values)
        self._durations = tuple(Durations(now, len(self._bounds)) for _ in self._labels)
        registry.register(self)

    def observe(self, seconds: float, series: int = 0) -> None:
        """One observation, into the ``series``-th value of the label (0 when unlabelled)."""
        durations = self._durations[series]
        durations.buckets[bisect_left(self._bounds, seconds)] += 1
        durations.sum += seconds

    def describe(self) -> list[Metric]:
        return [Metric(self._name, self._help, "histogram")]

    def collect(self) -> list[Metric]:
        family = Metric(self._name, self._help, "histogram")
        for labels, durations in zip(self._labels, self._durations, strict=True):
            add_histogram(family, labels, self._bound_labels, durations)
        return [family]


def add_histogram(
    family: Metric, labels: dict[str, str], bound_labels: Sequence[str], durations: Durations
) -> None:
    """One labelled histogram's samples, as prometheus_client's Histogram writes them."""
    name = family.name
    cumulative = 0
    for bound, hits in zip(bound_labels, list(durations.buckets), strict=True):
        cumulative += hits
        family.add_sample(name + "_bucket", {**labels, "le": bound}, float(cumulative))
    family.add_sample(name + "_count", labels, float(cumulative))
    family.add_sample(name + "_sum", labels, durations.sum)
    if metrics_module._use_created:
        family.add_sample(name + "_created", labels, durations.created)


@dataclass(slots=True)
class _Count:
    created: float
    value: int = 0


@dataclass(slots=True)
class Durations:
    created: float
    size: int
    buckets: list[int] = field(init=False)
    sum: float = 0.0

    def __post_init__(self) -> None:
        self.buckets = [0] * self.size
