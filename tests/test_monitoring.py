"""The chart's Grafana dashboard and PrometheusRule: they render and validate strictly, every
metric they query is one the programs export (scraped from a running podiam-server and
podiam-agent, each its own process), promtool accepts the rules, and a real Prometheus fires
"agent without a live node stream" when the agent's stream is cut and resolves it when the
stream returns."""

from __future__ import annotations

import asyncio
import json
import re

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import pytest_asyncio
import yaml

from tests.support import helm
from tests.support.monitoring import (
    EXTERNAL_METRICS,
    MONITORING_VALUES,
    dashboard_of,
    dashboard_queries,
    exported_names,
    metric_becomes,
    rendered_monitoring,
    rule_file,
    rule_queries,
    running_programs,
)
from tests.support.prometheus import promtool, running_prometheus
from tests.support.promql import PromqlSyntaxError, metric_names
from tests.support.waiting import eventually

KUBE_VERSIONS = [kubernetes_validate.utils.latest_version(), "1.30.0"]
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_DURATION = {"type": "string", "pattern": "^([0-9]+(ms|s|m|h|d|w|y))+$"}
# The PrometheusRule custom resource as the Prometheus Operator's CRD defines it (fields of
# monitoring.coreos.com/v1), strictly: an unknown or misspelt field is an error here, as it
# is for the API server with field validation.
PROMETHEUS_RULE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name", "namespace"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": _LABELS,
                "annotations": _LABELS,
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                            "limit": {"type": "integer"},
                            "labels": _LABELS,
                            "rules": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["expr"],
                                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                    "properties": {
                                        "alert": {"type": "string", "pattern": "^[A-Za-z]\\w*$"},
                                        "record": {"type": "string"},
                                        "expr": {"type": "string", "minLength": 1},
                                        "for": _DURATION,
                                        "keep_firing_for": {"type": "string"},
                                        "labels": _LABELS,
                                        "annotations": _LABELS,
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}  # fmt: skip
# Panels the issue asks for, by title.
PANELS = {
    "Credential requests by HTTP status",
    "Refusals by reason",
    "Agent latency (p50, p99)",
    "Server latency (p50, p99)",
    "Pod start to first credentials (p50, p99)",
    "AssumeRole calls by outcome",
    "STS errors and throttling",
    "Cache size and refresh outcomes",
    "Node streams connected vs agents",
    "Kubernetes watch restarts",
    "Agents in stale mode",
    "Certificate days left",
}
ALERTS = {
    "PodiamAgentNoNodeStream",
    "PodiamDenialsSurging",
    "PodiamAssumeRoleErrors",
    "PodiamStsThrottled",
    "PodiamCredentialsNearExpiry",
    "PodiamServerNotSynced",
    "PodiamCertificateExpiringSoon",
    "PodiamStartupTaintNotCleared",
}


@pytest.fixture(scope="module")
def monitoring():
    return rendered_monitoring({"prometheusRule": {"runbookBaseUrl": "https://runbooks.example"}})


# ---- rendering ------------------------------------------------------------------------------


def test_neither_object_is_rendered_by_default():
    kinds = {m["kind"] for m in helm.render({})}
    assert "PrometheusRule" not in kinds
    assert not any(m["kind"] == "ConfigMap" for m in helm.render({}))


def test_chart_with_dashboard_and_rule_lints_without_warnings():
    report = helm_python.lint(helm.CHART, MONITORING_VALUES, strict=True, namespace=helm.NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


def test_dashboard_config_map_is_valid_kubernetes_with_the_sidecar_label(monitoring):
    config_map, _rule = monitoring
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(config_map, version, strict=True)
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_dashboard_goes_where_the_sidecar_looks():
    config_map, _rule = rendered_monitoring(
        {"grafanaDashboard": {"namespace": "monitoring", "annotations": {"grafana_folder": "iam"}}}
    )
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "iam"}


def test_prometheus_rule_is_a_valid_custom_resource(monitoring):
    _config_map, rule = monitoring
    jsonschema.validate(rule, PROMETHEUS_RULE_SCHEMA)
    alerts = {alert for alert, _expr in rule_queries(rule)}
    assert alerts == ALERTS


def test_every_alert_carries_a_runbook_style_description(monitoring):
    _config_map, rule = monitoring
    for item in rule["spec"]["groups"][0]["rules"]:
        annotations = item["annotations"]
        assert annotations["summary"] and len(annotations["description"]) > 200, item["alert"]
        assert annotations["runbook_url"] == f"https://runbooks.example#{item['alert'].lower()}"
        assert item["labels"]["severity"] in {"critical", "warning"}


def test_alert_settings_reach_the_rule():
    _config_map, rule = rendered_monitoring(
        {
            "prometheusRule": {
                "interval": "15s",
                "labels": {"release": "kube-prometheus-stack"},
                "additionalLabels": {"team": "platform"},
                "agentNoNodeStream": {"for": "90s", "severity": "page"},
                "certificateExpiry": {"days": 14, "for": "1h", "severity": "warning"},
            }
        }
    )
    group = rule["spec"]["groups"][0]
    alerts = {item["alert"]: item for item in group["rules"]}
    assert group["interval"] == "15s"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    stream = alerts["PodiamAgentNoNodeStream"]
    assert stream["for"] == "90s" and stream["labels"] == {"severity": "page", "team": "platform"}
    assert "< 1209600" in alerts["PodiamCertificateExpiringSoon"]["expr"]


def test_startup_taint_alert_follows_the_taint_and_goes_without_it():
    _config_map, rule = rendered_monitoring({"server": {"startupTaint": "example.com/not-ready"}})
    exprs = dict(rule_queries(rule))
    assert 'key="example.com/not-ready"' in exprs["PodiamStartupTaintNotCleared"]
    _config_map, rule = rendered_monitoring({"server": {"startupTaint": ""}})
    assert "PodiamStartupTaintNotCleared" not in dict(rule_queries(rule))


@pytest.mark.parametrize(
    "values",
    [
        {"prometheusRule": {"agentNoNodeStream": {"for": "two minutes", "severity": "critical"}}},
        {"prometheusRule": {"certificateExpiry": {"days": 0, "for": "1h", "severity": "x"}}},
        {"prometheusRule": {"alerts": {}}},
        {"grafanaDashboard": {"enabled": "yes"}},
    ],
    ids=["bad-for", "zero-days", "unknown-key", "not-a-boolean"],
)
def test_schema_rejects_bad_monitoring_values(values):
    load = helm_python.Chart.load(helm.CHART)
    with load as chart, pytest.raises(helm_python.HelmValuesError):
        chart.render(values, name=helm.RELEASE, namespace=helm.NAMESPACE)


def test_dashboard_has_the_panels_an_operator_looks_at(monitoring):
    config_map, _rule = monitoring
    dashboard = dashboard_of(config_map)
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert PANELS <= titles, PANELS - titles
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["templating"]["list"][0]["type"] == "datasource"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel


# ---- reading PromQL -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        ('sum by (le, route) (rate(a_bucket{route="x"}[$__rate_interval]))', {"a_bucket"}),
        ("histogram_quantile(0.99, sum(rate(h_bucket[5m])) by (le))", {"h_bucket"}),
        ("a > 1 and b > 3 * (sum(rate(c[1h] offset 1h)) or vector(0))", {"a", "b", "c"}),
        ("(x_timestamp_seconds - time()) < 30 * 86400", {"x_timestamp_seconds"}),
        ('max by (node) (k{key="by", value=~"sum(x)"}) > 0', {"k"}),
        ("a / on (instance) group_left (mode) b", {"a", "b"}),
        ('{__name__="named", job="j"}', {"named"}),
        ("count without (pod) (rate(ns:rec:rate5m[5m] @ end()))", {"ns:rec:rate5m"}),
        ("a > bool 1e3 unless b != Inf", {"a", "b"}),
    ],
)
def test_metric_names_are_read_as_promql_reads_them(expr, names):
    assert metric_names(expr) == names


def test_unbalanced_promql_is_an_error_not_a_guess():
    with pytest.raises(PromqlSyntaxError):
        metric_names("sum(rate(a[5m])")


# ---- drift: what the dashboard and the rules query, the programs export ---------------------


@pytest_asyncio.fixture(scope="module")
async def programs(kube, moto_sts, tls_dirs, tmp_path_factory):
    async with running_programs(kube, moto_sts, tls_dirs, tmp_path_factory.mktemp("programs")) as p:
        yield p


def test_every_metric_the_dashboard_and_the_alerts_query_is_exported(monitoring, programs):
    config_map, rule = monitoring
    exported = exported_names(programs.server.metrics()) | exported_names(programs.agent.metrics())
    queries = [*dashboard_queries(dashboard_of(config_map)), *rule_queries(rule)]
    used: dict[str, set[str]] = {}
    for where, expr in queries:
        for name in metric_names(expr):
            used.setdefault(name, set()).add(where)
    missing = {
        name: sorted(where)
        for name, where in used.items()
        if name not in exported and name not in EXTERNAL_METRICS
    }
    assert not missing, f"queried but exported by neither program: {missing}"
    # Not vacuous: the queries cover the programs' metrics broadly, from both sides.
    assert len(used) >= 20
    assert any(n.startswith("podiam_agent_") for n in used)
    assert any(n.startswith("podiam_sts_") for n in used)


def test_each_program_exports_its_own_metrics_and_not_the_others(programs):
    server = exported_names(programs.server.metrics())
    agent = exported_names(programs.agent.metrics())
    assert "podiam_server_synced" in server and "podiam_server_synced" not in agent
    assert "podiam_agent_node_stream_connected" in agent
    assert "podiam_agent_node_stream_connected" not in server
    # Each side reports its own certificate and the CA it trusts.
    assert "podiam_server_certificate_expiry_timestamp_seconds" in server
    assert "podiam_agent_certificate_expiry_timestamp_seconds" in agent


# ---- the real Prometheus --------------------------------------------------------------------


def test_promtool_accepts_the_rendered_rules(monitoring, tmp_path):
    _config_map, rule = monitoring
    path = tmp_path / "podiam.rules.yml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_promtool_refuses_a_rule_with_broken_promql(tmp_path):
    path = tmp_path / "broken.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"alert": "Broken", "expr": "sum(rate(podiam_sts_errors_total[5m])"}
    ]}]}))  # fmt: skip
    result = promtool("check", "rules", str(path))
    assert result.returncode != 0


async def test_no_node_stream_alert_fires_when_the_stream_is_cut_and_resolves_when_back(
    programs, tmp_path
):
    _config_map, rule = rendered_monitoring(
        {"prometheusRule": {"interval": "1s", "agentNoNodeStream": {"for": "3s"}}}
    )
    targets = [
        ("podiam-server", programs.server.metrics_port),
        ("podiam-agent", programs.agent.metrics_port),
    ]
    async with running_prometheus(tmp_path, targets=targets, rules=rule_file(rule)) as prom:
        alert = "PodiamAgentNoNodeStream"
        await asyncio.sleep(3)  # several evaluations with the stream live
        assert prom.state(alert) == "inactive"

        programs.proxy.refuse()  # the network between agent and server is gone
        await metric_becomes(programs.agent, "podiam_agent_node_stream_connected", 0.0)
        await eventually(lambda: prom.state(alert) == "pending", timeout=30, interval=0.2)
        await eventually(lambda: prom.state(alert) == "firing", timeout=30, interval=0.2)
        (firing,) = prom.alerts(alert)
        assert firing["labels"]["job"] == "podiam-agent"
        assert firing["labels"]["severity"] == "critical"
        assert "has no live node stream" in firing["annotations"]["summary"]

        programs.proxy.accept()  # the agent reconnects on its own
        await metric_becomes(programs.agent, "podiam_agent_node_stream_connected", 1.0, 60)
        await eventually(lambda: prom.state(alert) == "inactive", timeout=30, interval=0.2)


async def test_prometheus_parses_every_query_and_reads_the_same_metric_names(
    monitoring, programs, tmp_path
):
    config_map, rule = monitoring
    queries = [*dashboard_queries(dashboard_of(config_map)), *rule_queries(rule)]
    targets = [("podiam-agent", programs.agent.metrics_port)]
    async with running_prometheus(tmp_path, targets=targets, rules='{"groups": []}') as prom:
        for where, expr in queries:
            # Grafana fills $__rate_interval in; Prometheus must see a duration there.
            concrete = expr.replace("$__rate_interval", "1m")
            tree = prom.api("parse_query", query=concrete)
            assert _selector_names(tree) == metric_names(expr), (where, expr)


def _selector_names(node) -> set[str]:
    """Metric names of every selector (instant or range) in Prometheus's parse tree."""
    names = set()
    if isinstance(node, dict):
        if node.get("type") in ("vectorSelector", "matrixSelector"):
            name = node.get("name") or next(
                (m["value"] for m in node.get("matchers", []) if m.get("name") == "__name__"), ""
            )
            names.add(name)
        for value in node.values():
            names |= _selector_names(value)
    elif isinstance(node, list):
        for value in node:
            names |= _selector_names(value)
    return names


def test_rule_file_is_what_the_operator_writes(monitoring):
    _config_map, rule = monitoring
    assert json.loads(rule_file(rule)) == {"groups": rule["spec"]["groups"]}
    assert re.search(r"podiam_agent_node_stream_connected == 0", rule_file(rule))
