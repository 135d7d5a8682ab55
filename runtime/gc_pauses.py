"""Time every pass of CPython's cyclic garbage collector, by generation, for /metrics.

A collection stops the whole process: the event loop, and with it every watch, node stream and
request, waits until it ends. In the server, whose index is most of the heap, a full
collection can take a large fraction of a second (server/heap.py), so operators need to see
how often the collector runs and for how long: ``podiam_gc_pause_seconds{generation}``.

The callback runs inside the collector, on whatever thread allocated when it triggered, so it
must not take a lock (prometheus_client's Histogram takes one: a collection triggered while
that lock is held by the same thread would deadlock). Counted as runtime/request_metrics.py
counts, in plain numbers that a scrape reads whole under the GIL. One instance per process,
shared by the agent and the server (the tests run both in one process).
"""

from __future__ import annotations

import gc
import time
from bisect import bisect_left
from collections.abc import Sequence

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import INF, floatToGoString

from runtime.request_metrics import Durations, add_histogram

BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class GcPauses:
    """``<name>{generation}``: a histogram of collector passes, once ``install``ed."""

    def __init__(
        self,
        name: str,
        help_text: str,
        *,
        buckets: Sequence[float] = BUCKETS,
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self._name, self._help = name, help_text
        self._bounds = (*sorted(buckets), INF)
        self._bound_labels = tuple(floatToGoString(bound) for bound in self._bounds)
        now = time.time()
        # Every generation from the start, so that a dashboard sees 0 rather than no series.
        self._durations = tuple(Durations(now, len(self._bounds)) for _ in range(3))
        self._started = 0.0
        registry.register(self)

    def install(self) -> None:
        """Start timing collections (idempotent: the agent and server may both call it)."""
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        seconds = time.perf_counter() - self._started
        durations = self._durations[info["generation"]]
        durations.buckets[bisect_left(self._bounds, seconds)] += 1
        durations.sum += seconds

    def describe(self) -> list[Metric]:
        return [Metric(self._name, self._help, "histogram")]

    def collect(self) -> list[Metric]:
        family = Metric(self._name, self._help, "histogram")
        for generation, durations in enumerate(self._durations):
            add_histogram(family, {"generation": str(generation)}, self._bound_labels, durations)
        return [family]


GC_PAUSES = GcPauses(
    "podiam_gc_pause_seconds",
    "Time the process stood still in each pass of the cyclic garbage collector, by "
    "generation (2: a full collection).",
)
