"""The collector's pauses on /metrics (runtime/gc_pauses.py), by generation: the real ``gc``
module, collections forced in the test."""

from __future__ import annotations

import gc

import aiohttp
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from runtime.gc_pauses import GcPauses


def test_a_forced_full_collection_is_counted_under_generation_2():
    registry = CollectorRegistry()
    pauses = GcPauses("test_gc_pause_seconds", "help", registry=registry)
    pauses.install()
    try:
        before = registry.get_sample_value("test_gc_pause_seconds_count", {"generation": "2"})
        gc.collect()
        after = registry.get_sample_value("test_gc_pause_seconds_count", {"generation": "2"})
    finally:
        pauses.uninstall()
    assert (before, after) == (0.0, 1.0)
    assert registry.get_sample_value("test_gc_pause_seconds_sum", {"generation": "2"}) > 0
    gc.collect()  # uninstalled: no longer counted
    assert registry.get_sample_value("test_gc_pause_seconds_count", {"generation": "2"}) == 1.0


def test_installing_twice_counts_each_collection_once():
    registry = CollectorRegistry()
    pauses = GcPauses("twice_gc_pause_seconds", "help", registry=registry)
    pauses.install()
    pauses.install()
    try:
        gc.collect()
    finally:
        pauses.uninstall()
    assert registry.get_sample_value("twice_gc_pause_seconds_count", {"generation": "2"}) == 1.0
    assert gc.callbacks.count(pauses._callback) == 0


async def test_server_metrics_show_collector_pauses_by_generation(podiam):
    def counts() -> dict[str, float]:
        return {
            sample.labels["generation"]: sample.value
            for family in REGISTRY.collect()
            if family.name == "podiam_gc_pause_seconds"
            for sample in family.samples
            if sample.name == "podiam_gc_pause_seconds_count"
        }

    before = counts()
    gc.collect()
    after = counts()
    assert set(after) == {"0", "1", "2"}
    assert after["2"] == before["2"] + 1


async def test_agent_metrics_show_collector_pauses_by_generation(agent):
    gc.collect()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{agent.metrics_port}/metrics") as response:
            text = await response.text()
    counts = {
        sample.labels["generation"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "podiam_gc_pause_seconds"
        for sample in family.samples
        if sample.name == "podiam_gc_pause_seconds_count"
    }
    assert set(counts) == {"0", "1", "2"}
    assert counts["2"] >= 1
