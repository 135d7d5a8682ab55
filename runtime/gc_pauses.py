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
from collections.abc import Sequence

from prometheus_client import REGISTRY, CollectorRegistry

from runtime.request_metrics import SecondsHistogram

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
        self._histogram = SecondsHistogram(
            name, help_text, buckets=buckets, label=("generation", ("0", "1", "2")),
            registry=registry,
        )  # fmt: skip
        self._started = 0.0

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
        self._histogram.observe(time.perf_counter() - self._started, info["generation"])


GC_PAUSES = GcPauses(
    "podiam_gc_pause_seconds",
    "Time the process stood still in each pass of the cyclic garbage collector, by "
    "generation (2: a full collection).",
)
