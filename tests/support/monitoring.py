"""What the monitoring tests need: the chart's dashboard and alerting rules as Helm renders them,
the PromQL each one runs, the metric names a /metrics page exports, and podiam-server and
podiam-agent as separate processes on loopback (each its own /metrics, as Prometheus scrapes
them), the agent reaching the server through a proxy the test can cut.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support.agent import agent_argv
from tests.support.controlplane import free_port
from tests.support.helm import Manifest, one, render
from tests.support.kubeapi import KubeApiServer
from tests.support.moto_sts import MotoSts
from tests.support.server import server_argv
from tests.support.tcpproxy import TcpProxy
from tests.support.tls import TlsDirs
from tests.support.waiting import eventually

MONITORING_VALUES: dict[str, Any] = {
    "grafanaDashboard": {"enabled": True},
    "prometheusRule": {"enabled": True},
}
# Metrics the rules read that other exporters provide; podiam never lists nodes.
EXTERNAL_METRICS = {"kube_node_spec_taint": "kube-state-metrics"}
# Sample names each metric type adds to its family's name in the text exposition format.
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "unknown": ("",),
}


def rendered_monitoring(values: Mapping[str, Any] | None = None) -> tuple[Manifest, Manifest]:
    """The dashboard's ConfigMap and the PrometheusRule, rendered with both enabled."""
    merged = {**MONITORING_VALUES}
    for key, value in (values or {}).items():
        merged[key] = {**merged.get(key, {}), **value}
    manifests = render(merged)
    return one(manifests, "ConfigMap", "podiam-dashboard"), one(manifests, "PrometheusRule")


def dashboard_of(config_map: Manifest) -> dict[str, Any]:
    return json.loads(config_map["data"]["podiam.json"])


def dashboard_queries(dashboard: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL) of every panel's targets, rows' nested panels included."""
    for panel in dashboard.get("panels", []):
        yield from dashboard_queries(panel)
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield panel["title"], target["expr"]


def rule_queries(rule: Manifest) -> Iterator[tuple[str, str]]:
    for group in rule["spec"]["groups"]:
        for item in group["rules"]:
            yield item.get("alert") or item.get("record"), item["expr"]


def rule_file(rule: Manifest) -> str:
    """The PrometheusRule's groups as a Prometheus rule file (what the Operator writes)."""
    return json.dumps({"groups": rule["spec"]["groups"]}, indent=2)


def exported_names(exposition: str) -> set[str]:
    """Every sample name a /metrics page may carry: each family's name with its type's
    suffixes, whether or not the family has samples yet (a labelled metric nobody has touched
    still declares its TYPE)."""
    names = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
        names.update(sample.name for sample in family.samples)
    return names


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def sample_value(exposition: str, name: str) -> float | None:
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    return None


@dataclass
class Process:
    name: str
    process: asyncio.subprocess.Process
    metrics_port: int
    log: Path

    def metrics(self) -> str:
        return scrape(self.metrics_port)

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 15)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


@dataclass
class Programs:
    server: Process
    agent: Process
    proxy: TcpProxy  # the agent's way to the server


async def _spawn(name: str, module: str, argv: list[str], log: Path, port: int) -> Process:
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", module, *argv,
            stdout=out, stderr=asyncio.subprocess.STDOUT, env={**os.environ},
        )  # fmt: skip
    return Process(name, process, port, log)


async def _metric_is(process: Process, name: str, value: float, within: float = 30) -> None:
    def check() -> bool:
        if process.process.returncode is not None:
            raise AssertionError(f"{process.name} exited: {process.log.read_text()[-3000:]}")
        try:
            return sample_value(process.metrics(), name) == value
        except OSError:
            return False

    await eventually(check, timeout=within, interval=0.1)


@asynccontextmanager
async def running_programs(
    kube: KubeApiServer, sts: MotoSts, tls: TlsDirs, tmp: Path
) -> AsyncIterator[Programs]:
    """podiam-server and podiam-agent as processes, both synced: the server has listed, the
    agent holds a live node stream through ``proxy``."""
    kubeconfig = tmp / "kubeconfig"
    kube.write_kubeconfig(str(kubeconfig))
    grpc_port, server_metrics, agent_metrics = free_port(), free_port(), free_port()
    argv = server_argv(kubeconfig=kubeconfig, sts=sts, tls=tls)
    argv += ["--bind", f"127.0.0.1:{grpc_port}"]
    argv += ["--prometheus-listen-addr", f"127.0.0.1:{server_metrics}"]
    server = await _spawn("server", "server", argv, tmp / "server.log", server_metrics)
    proxy = TcpProxy("127.0.0.1", grpc_port)
    await proxy.start()
    agent = None
    try:
        await _metric_is(server, "podiam_server_synced", 1.0)
        argv = agent_argv(server_port=proxy.port, tls=tls, metadata=sts.endpoint_url)
        argv += ["--prometheus-listen-addr", f"127.0.0.1:{agent_metrics}"]
        agent = await _spawn("agent", "agent", argv, tmp / "agent.log", agent_metrics)
        await _metric_is(agent, "podiam_agent_node_stream_connected", 1.0)
        yield Programs(server, agent, proxy)
    finally:
        if agent is not None:
            await agent.stop()
        await server.stop()
        await proxy.stop()


async def metric_becomes(process: Process, name: str, value: float, within: float = 30) -> None:
    await _metric_is(process, name, value, within)
