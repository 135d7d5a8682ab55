"""The Helm chart, rendered by Helm's own Go SDK: it lints, every object it renders is valid
Kubernetes, every flag it passes is one the programs accept, generated TLS material is real and
survives upgrades, and the server's health probe works against a real server."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.config import parse_config as parse_agent_config
from agent.limits import ListenerLimits
from certs.check import check_dir
from server.app import PodiamServer
from server.config import parse_config as parse_server_config
from tests.support.helm import CHART, NAMESPACE, Manifest, SecretsApi, container, notes, one, render
from tests.support.kubeapi import KubeApiServer
from tests.support.moto_sts import fake_session

# Kubernetes versions every object must validate against, strictly (no unknown fields): the
# newest the installed kubernetes-validate knows, and the oldest EKS still supports.
KUBE_VERSIONS = [kubernetes_validate.utils.latest_version(), "1.30.0"]
# Custom resources kubernetes-validate has no schema for (Prometheus Operator, cert-manager).
CRD_KINDS = {"ServiceMonitor", "Certificate", "Issuer"}

ROLE_BASE = "arn:aws:iam::123456789012:role/"
SERVER_FQDN = f"podiam-server.{NAMESPACE}.svc.cluster.local"

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "generated-tls-with-extra-names": {
        "tls": {"mode": "generate", "extraServerNames": ["kiam-server", "10.0.0.9"]}
    },
    "existing-secret": {
        "tls": {"mode": "existingSecret", "existingSecret": {"server": "srv", "agent": "agt"}}
    },
    "cert-manager-own-ca": {"tls": {"mode": "certManager"}},
    "cert-manager-issuer": {
        "tls": {
            "mode": "certManager",
            "certManager": {"issuerRef": {"kind": "ClusterIssuer", "name": "corp-ca"}},
        }
    },
    "iptables-off": {"agent": {"iptables": False}},
    "service-monitor": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
    "custom-taints": {
        "server": {
            "dedicatedNodes": {
                "label": {"key": "node-role/iam", "value": "yes"},
                "taint": {"key": "dedicated", "value": "iam", "effect": "NoSchedule"},
            },
            "nodeSelector": {"topology.kubernetes.io/zone": "eu-west-1a"},
            "tolerations": [{"key": "spot", "operator": "Exists"}],
        }
    },
    "no-dedicated-nodes": {
        "server": {"dedicatedNodes": {"label": None, "taint": None}, "hostNetwork": False}
    },
    "pod-network-server-with-network-policy": {
        "server": {"hostNetwork": False},
        "networkPolicy": {
            "enabled": True,
            "agentCIDRs": ["10.0.0.0/16"],
            "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
        },
    },
    "servers-only-for-kiam-agents": {
        "agent": {"enabled": False},
        "tls": {"extraServerNames": ["kiam-server"]},
    },
    "startup-taint-off": {"server": {"startupTaint": ""}},
    "startup-taint-null": {"server": {"startupTaint": None}},
    "custom-agent-tolerations": {"agent": {"tolerations": [{"key": "gpu", "operator": "Exists"}]}},
    "metrics-off": {
        "server": {"metrics": {"enabled": False}},
        "agent": {"metrics": {"enabled": False}},
    },
    "sts-economy": {
        "server": {
            "sessionNameFrom": "pod",
            "auditLog": "/var/log/podiam/audit",
            "sessionTags": True,
            "transitiveSessionTags": True,
            "clusterName": "prod-eu",
            "stsQps": 12.5,
            "stsBurst": 30,
        }
    },
    "token-credentials": {"tokenCredentials": {"enabled": True, "address": "169.254.170.24"}},
    "every-flag": {
        "server": {
            "roleBaseArn": ROLE_BASE,
            "assumeRoleArn": "arn:aws:iam::123456789012:role/podiam-hop",
            "region": "eu-west-1",
            "stsEndpoint": "https://sts.eu-west-1.amazonaws.com",
            "sessionDuration": "2h",
            "sessionRefresh": "45m",
            "sessionName": "eks-prod",
            "nodeBinding": False,
            "startupTaint": "example.com/podiam-not-ready",
            "allowedAccounts": ["111111111111", "222222222222"],
            "maxConnectionAge": "5m",
            "logLevel": "debug",
            "jsonLog": False,
            "metrics": {"port": 9700},
            "port": 9443,
            "extraArgs": ["--metadata-endpoint=http://169.254.169.254"],
            "extraEnv": [{"name": "AWS_STS_REGIONAL_ENDPOINTS", "value": "regional"}],
        },
        "agent": {
            "port": 8282,
            "hostInterface": "!docker0",
            "allowRouteRegexp": "^/latest/meta-data/placement/region$",
            "podWait": "500ms",
            "staleGrace": "0s",
            "requireImdsv2": True,
            "limits": {
                "connectionsPerIP": 16,
                "connections": 2000,
                "headerTimeout": "2s",
                "keepaliveTimeout": "30s",
                "headerBytes": 4096,
                "bodyBytes": 0,
                "podRequestsPerSecond": 250.5,
                "podRequestBurst": 600,
            },
            "logLevel": "warning",
            "jsonLog": False,
            "metrics": {"port": 9701},
            "extraArgs": ["--metadata-endpoint=http://169.254.169.254"],
            "extraEnv": [{"name": "PODIAM_LOG_LEVEL", "value": "error"}],
        },
    },
}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Manifest]]:
    return {name: render(values) for name, values in VALUE_SETS.items()}


def env_of(spec: dict[str, Any]) -> dict[str, str]:
    """A container's environment as the kubelet would give it, with fields of the pod filled in
    (the node's IP for status.hostIP)."""
    env = {}
    for var in spec.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.hostIP":
            env[var["name"]] = "10.0.1.23"
        elif var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName":
            env[var["name"]] = "ip-10-0-1-23.eu-west-1.compute.internal"
        else:
            raise AssertionError(f"unexpected env source {var}")
    return env


def secret_pem(manifests: list[Manifest], name: str, key: str) -> bytes:
    return base64.b64decode(one(manifests, "Secret", name)["data"][key])


# --- Helm: lint, render, schema --------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_chart_lints_without_warnings(name):
    report = helm.lint(CHART, VALUE_SETS[name], strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_object_is_valid_kubernetes(rendered, name):
    kinds = set()
    for manifest in rendered[name]:
        kinds.add(manifest["kind"])
        if manifest["kind"] in CRD_KINDS:
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(manifest, version, strict=True)
    assert {"Deployment", "Service", "ClusterRole", "ServiceAccount"} <= kinds


def test_value_sets_render_the_optional_objects(rendered):
    def kinds(name):
        return sorted(m["kind"] for m in rendered[name])

    assert kinds("defaults").count("Secret") == 2
    assert "Secret" not in kinds("existing-secret")
    assert kinds("cert-manager-own-ca").count("Certificate") == 3  # CA, server, agent
    assert kinds("cert-manager-issuer").count("Certificate") == 2
    assert "Issuer" not in kinds("cert-manager-issuer")
    assert kinds("service-monitor").count("ServiceMonitor") == 2
    assert "NetworkPolicy" in kinds("pod-network-server-with-network-policy")
    assert "PodDisruptionBudget" in kinds("defaults")
    servers_only = kinds("servers-only-for-kiam-agents")
    assert "DaemonSet" not in servers_only and servers_only.count("ServiceAccount") == 1
    assert "Deployment" in servers_only and servers_only.count("Secret") == 2


def test_schema_rejects_a_typo():
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError, match="replica"):
        chart.render({"server": {"replica": 3}}, name="podiam", namespace=NAMESPACE)
    report = helm.lint(CHART, {"agent": {"hostInterfaces": "cali+"}}, namespace=NAMESPACE)
    assert any("hostInterfaces" in error for error in report["errors"])


@pytest.mark.parametrize(
    "values",
    [
        {"agent": {"port": "8181"}},
        {"server": {"replicas": "2"}},
        {"agent": {"iptables": "yes"}},
        {"server": {"logLevel": "verbose"}},
        {"server": {"sessionDuration": "one hour"}},
        {"agent": {"hostInterface": "eni+; reboot"}},
        {"server": {"startupTaint": "not a key"}},
        {"tls": {"mode": "selfsigned"}},
        {"server": {"allowedAccounts": "111111111111"}},
        {"server": {"allowedAccounts": ["1111"]}},
    ],
)
def test_schema_rejects_wrong_types_and_values(values):
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)


def test_existing_secret_mode_names_its_missing_secrets():
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmRenderError, match="existingSe"):
        chart.render({"tls": {"mode": "existingSecret"}}, name="podiam", namespace=NAMESPACE)


def test_notes_tell_how_to_annotate_and_verify():
    text = notes()
    assert "iam.amazonaws.com/permitted" in text
    assert "iam.amazonaws.com/role" in text
    assert "sts get-caller-identity" in text
    assert "podiam.io/agent-not-ready=true:NoExecute" in text
    assert "never be removed" not in text


@pytest.mark.parametrize("values", [{"agent": {"iptables": False}}, {"agent": {"enabled": False}}])
def test_notes_warn_when_no_agent_could_remove_the_startup_taint(values):
    assert "never be removed" in notes(values)
    assert "agent-not-ready" not in notes({**values, "server": {"startupTaint": ""}})


# --- Chart and programs cannot drift apart ---------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rendered_arguments_are_accepted_by_the_real_parsers(rendered, name):
    server = container(rendered[name], "Deployment")
    assert server["command"] == ["podiam-server"]
    parse_server_config(server["args"], environ=env_of(server))
    if VALUE_SETS[name].get("agent", {}).get("enabled", True):
        agent = container(rendered[name], "DaemonSet")
        assert agent["command"] == ["podiam-agent"]
        parse_agent_config(agent["args"], environ=env_of(agent))


def test_every_tuned_value_reaches_its_flag(rendered):
    server_spec = container(rendered["every-flag"], "Deployment")
    agent_spec = container(rendered["every-flag"], "DaemonSet")
    server = parse_server_config(server_spec["args"], environ=env_of(server_spec))
    agent = parse_agent_config(agent_spec["args"], environ=env_of(agent_spec))

    assert server.bind == ("0.0.0.0", 9443)
    assert server.role_base_arn == ROLE_BASE
    assert server.assume_role_arn == "arn:aws:iam::123456789012:role/podiam-hop"
    assert (server.region, server.sts_endpoint) == (
        "eu-west-1",
        "https://sts.eu-west-1.amazonaws.com",
    )
    assert server.session_duration.total_seconds() == 7200
    assert server.session_refresh.total_seconds() == 45 * 60
    assert server.session_name == "eks-prod"
    assert server.node_binding is False
    assert server.startup_taint == "example.com/podiam-not-ready"
    assert server.allowed_accounts == {"111111111111", "222222222222"}
    assert server.max_connection_age.total_seconds() == 300
    assert (server.log_level, server.json_log) == ("DEBUG", False)
    assert server.prometheus_listen_addr == ("0.0.0.0", 9700)
    assert {"name": "AWS_STS_REGIONAL_ENDPOINTS", "value": "regional"} in server_spec["env"]

    assert agent.host == "10.0.1.23"
    assert agent.node_name == "ip-10-0-1-23.eu-west-1.compute.internal"
    assert agent.port == 8282
    assert agent.server_address == f"{SERVER_FQDN}:9443"
    assert (agent.iptables, agent.host_interface) == (True, "!docker0")
    assert (
        "initContainers" not in one(rendered["every-flag"], "DaemonSet")["spec"]["template"]["spec"]
    )
    assert agent.allow_route_regexp.pattern == "^/latest/meta-data/placement/region$"
    assert agent.pod_wait.total_seconds() == 0.5
    assert agent.stale_grace.total_seconds() == 0
    assert agent.require_imdsv2 is True
    assert agent.limits == ListenerLimits(
        connections_per_ip=16, connections=2000, header_timeout=2.0, keepalive_timeout=30.0,
        header_bytes=4096, body_bytes=0, pod_rate=250.5, pod_burst=600,
    )  # fmt: skip
    assert (agent.log_level, agent.json_log) == ("WARNING", False)
    assert agent.prometheus_listen_addr == ("0.0.0.0", 9701)


def test_defaults_are_the_programs_defaults_except_where_the_chart_says_why(rendered):
    server_spec = container(rendered["defaults"], "Deployment")
    agent_spec = container(rendered["defaults"], "DaemonSet")
    server = parse_server_config(server_spec["args"], environ=env_of(server_spec))
    agent = parse_agent_config(agent_spec["args"], environ=env_of(agent_spec))
    assert server.role_base_arn_autodetect and server.role_base_arn is None
    assert server.node_binding and server.json_log
    assert server.startup_taint == "podiam.io/agent-not-ready"
    assert server.allowed_accounts == frozenset()  # the base ARN's account only
    assert str(server.session_duration) == "1:00:00"
    assert agent.iptables and agent.host_interface == "eni+"
    assert agent.port == 8181
    # Both run in the host network on the server nodes: different metrics ports.
    assert server.prometheus_listen_addr[1] != agent.prometheus_listen_addr[1]


@pytest.mark.parametrize("name", ["defaults", "every-flag"])
def test_agents_dial_the_port_the_server_listens_on(rendered, name):
    """A headless Service resolves to the pods' own IPs: no port mapping happens, so the agent's
    port, the Service's port and the container's port must all be one."""
    manifests = rendered[name]
    server = parse_server_config(
        container(manifests, "Deployment")["args"], environ={}
    )  # the server's own view of its port
    agent_spec = container(manifests, "DaemonSet")
    agent = parse_agent_config(agent_spec["args"], environ=env_of(agent_spec))
    service = one(manifests, "Service", "podiam-server")
    assert service["spec"]["clusterIP"] == "None"
    grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    container_port = next(
        p for p in container(manifests, "Deployment")["ports"] if p["name"] == "grpc"
    )
    host, port = agent.server_address.rsplit(":", 1)
    assert host == SERVER_FQDN
    assert int(port) == grpc_port["port"] == container_port["containerPort"] == server.bind[1]
    assert server.bind[1] >= 1024  # non-root, no capabilities


# --- Security settings -----------------------------------------------------------------------


def test_agent_has_no_kubernetes_permissions(rendered):
    manifests = rendered["defaults"]
    bindings = [m for m in manifests if m["kind"] in {"RoleBinding", "ClusterRoleBinding"}]
    subjects = [s["name"] for b in bindings for s in b["subjects"]]
    assert subjects == ["podiam-server"]
    pod = one(manifests, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert one(manifests, "ServiceAccount", "podiam-agent")["automountServiceAccountToken"] is False


def granted(manifests: list[Manifest]) -> set[tuple[str, str]]:
    """(resource, verb) pairs; resources outside the core group as <group>/<resource>."""
    rules = one(manifests, "ClusterRole")["rules"]
    assert all(len(rule["apiGroups"]) == 1 for rule in rules)
    return {
        (resource if rule["apiGroups"] == [""] else f"{rule['apiGroups'][0]}/{resource}", verb)
        for rule in rules
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_token_credentials_add_only_tokenreviews_create(rendered):
    added = granted(rendered["token-credentials"]) - granted(rendered["defaults"])
    assert added == {("authentication.k8s.io/tokenreviews", "create")}
    assert not any(m["kind"] == "MutatingWebhookConfiguration" for m in rendered["defaults"])


def test_token_webhook_never_blocks_pods_and_is_trusted_by_its_ca_bundle(rendered):
    manifests = rendered["token-credentials"]
    config = one(manifests, "MutatingWebhookConfiguration")
    (hook,) = config["webhooks"]
    assert hook["failurePolicy"] == "Ignore"
    assert hook["sideEffects"] == "None"
    assert hook["namespaceSelector"] == {"matchLabels": {"podiam.io/token-credentials": "enabled"}}
    assert hook["rules"][0]["operations"] == ["CREATE"]
    service_ref = hook["clientConfig"]["service"]
    service = one(manifests, "Service", service_ref["name"])
    assert service["spec"].get("clusterIP") != "None"  # the API server needs a cluster IP
    (port,) = service["spec"]["ports"]
    assert (port["port"], port["targetPort"]) == (service_ref["port"], "webhook")
    server = container(manifests, "Deployment")
    assert {"name": "webhook", "containerPort": 8444, "protocol": "TCP"} in server["ports"]
    # The serving certificate is for the name the API server calls, signed by the caBundle.
    secret = one(manifests, "Secret", "podiam-server-webhook-tls")
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    ca = x509.load_pem_x509_certificate(base64.b64decode(hook["clientConfig"]["caBundle"]))
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert f"{service_ref['name']}.{NAMESPACE}.svc" in names.get_values_for_type(x509.DNSName)
    mounted = {m["mountPath"] for m in server["volumeMounts"]}
    assert "/etc/podiam/webhook-tls" in mounted


def test_token_credentials_point_webhook_and_agents_at_one_address(rendered):
    manifests = rendered["token-credentials"]
    server_spec = container(manifests, "Deployment")
    agent_spec = container(manifests, "DaemonSet")
    server = parse_server_config(server_spec["args"], environ=env_of(server_spec))
    agent = parse_agent_config(agent_spec["args"], environ=env_of(agent_spec))
    assert server.token_credentials and agent.token_endpoint
    assert server.webhook_endpoint == "http://169.254.170.24/v1/credentials"
    assert agent.token_address == ("169.254.170.24", 80)
    assert server.webhook_bind == ("0.0.0.0", 8444)


def test_server_may_only_watch_pods_and_namespaces_record_events_and_untaint_nodes(rendered):
    assert granted(rendered["defaults"]) == {
        ("pods", "get"),
        ("pods", "list"),
        ("pods", "watch"),
        ("namespaces", "get"),
        ("namespaces", "list"),
        ("namespaces", "watch"),
        ("events", "create"),
        ("events", "patch"),
        ("nodes", "get"),
        ("nodes", "patch"),
    }
    # Without the startup taint the server has no business with nodes.
    assert {r for r, _ in granted(rendered["startup-taint-off"])} == {
        "pods",
        "namespaces",
        "events",
    }


@pytest.mark.parametrize("name", ["defaults", "custom-agent-tolerations", "every-flag"])
def test_agents_and_servers_tolerate_the_startup_taint(rendered, name):
    manifests = rendered[name]
    server_spec = container(manifests, "Deployment")
    key = parse_server_config(server_spec["args"], environ=env_of(server_spec)).startup_taint
    toleration = {"key": key, "operator": "Exists"}  # any value, any effect
    for kind in ("DaemonSet", "Deployment"):
        assert toleration in one(manifests, kind)["spec"]["template"]["spec"]["tolerations"], kind
    agent = one(manifests, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]
    assert {
        "name": "NODE_NAME",
        "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}},
    } in agent["env"]


@pytest.mark.parametrize("name", ["startup-taint-off", "startup-taint-null"])
def test_without_the_startup_taint_nothing_tolerates_it(rendered, name):
    manifests = rendered[name]
    assert "nodes" not in {r for r, _ in granted(manifests)}
    server_spec = container(manifests, "Deployment")
    assert parse_server_config(server_spec["args"], environ={}).startup_taint is None
    server_pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    assert all(t.get("key") != "podiam.io/agent-not-ready" for t in server_pod["tolerations"])


def test_agent_gets_net_admin_only_with_iptables(rendered):
    on = container(rendered["defaults"], "DaemonSet")
    off = container(rendered["iptables-off"], "DaemonSet")
    assert set(on["securityContext"]["capabilities"]["add"]) == {"NET_ADMIN", "NET_RAW"}
    assert {"name": "xtables-lock", "mountPath": "/run/xtables.lock"} in on["volumeMounts"]
    assert "add" not in off["securityContext"]["capabilities"]
    assert off["securityContext"]["runAsNonRoot"] is True
    assert "--iptables" not in off["args"]
    for spec in (on, off):
        assert spec["securityContext"]["allowPrivilegeEscalation"] is False
        assert spec["securityContext"]["readOnlyRootFilesystem"] is True


def test_agent_runs_everywhere_with_the_node_network(rendered):
    ds = one(rendered["defaults"], "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert {"operator": "Exists"} in pod["tolerations"]
    assert pod["priorityClassName"] == "system-node-critical"
    # Notice to keep-alive clients (1s), then drain (5s); the rule stays.
    assert pod["terminationGracePeriodSeconds"] >= 10
    agent = pod["containers"][0]
    assert agent["livenessProbe"]["httpGet"]["path"] == "/ping"
    assert {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}} in agent[
        "env"
    ]
    assert "affinity" not in pod  # the server is in the host network: the agent may go there


def test_agent_upgrades_surge_beside_the_old_agent_and_wait_for_its_own_readiness(rendered):
    ds = one(rendered["defaults"], "DaemonSet")
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    pod = ds["spec"]["template"]["spec"]
    agent = pod["containers"][0]
    # A declared port is a hostPort in the host network: the scheduler would keep the surging
    # agent off its node (kubernetes/kubernetes#106417), and the upgrade would never finish.
    assert "ports" not in agent
    assert agent["livenessProbe"]["httpGet"]["port"] == 8181
    # Readiness asks this process, not whichever agent answers the shared port.
    config = parse_agent_config(agent["args"], environ=env_of(agent))
    assert agent["readinessProbe"]["exec"]["command"] == ["test", "-e", str(config.ready_file)]
    assert config.ready_file.parent == Path("/tmp")
    assert {"name": "tmp", "mountPath": "/tmp"} in agent["volumeMounts"]
    # The handover needs no privileged helper: the new agent steers connections itself.
    assert "initContainers" not in pod


def test_agent_metrics_service_targets_the_port_by_number():
    manifests = render({"serviceMonitor": {"enabled": True}})
    service = one(manifests, "Service", "podiam-agent-metrics")
    assert service["spec"]["ports"][0]["targetPort"] == 9620


def test_server_runs_hardened_on_dedicated_nodes(rendered):
    deployment = one(rendered["defaults"], "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 2
    assert pod["nodeSelector"] == {"podiam-server": "true"}
    assert pod["tolerations"] == [
        {"key": "podiam-server", "operator": "Equal", "value": "true", "effect": "NoExecute"},
        {"key": "podiam.io/agent-not-ready", "operator": "Exists"},
    ]
    anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname"
    spec = pod["containers"][0]
    assert spec["resources"]["requests"] and spec["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["securityContext"]["allowPrivilegeEscalation"] is False
    assert spec["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    pdb = one(rendered["defaults"], "PodDisruptionBudget")
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]


def test_custom_taints_and_labels_reach_the_server(rendered):
    pod = one(rendered["custom-taints"], "Deployment")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {
        "node-role/iam": "yes",
        "topology.kubernetes.io/zone": "eu-west-1a",
    }
    assert pod["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "iam", "effect": "NoSchedule"},
        {"key": "spot", "operator": "Exists"},
        {"key": "podiam.io/agent-not-ready", "operator": "Exists"},
    ]
    unlabelled = one(rendered["no-dedicated-nodes"], "Deployment")["spec"]["template"]["spec"]
    assert "nodeSelector" not in unlabelled
    assert unlabelled["tolerations"] == [{"key": "podiam.io/agent-not-ready", "operator": "Exists"}]


def test_pod_network_server_keeps_agents_off_the_server_nodes(rendered):
    manifests = rendered["pod-network-server-with-network-policy"]
    server_pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    assert "hostNetwork" not in server_pod
    agent_pod = one(manifests, "DaemonSet")["spec"]["template"]["spec"]
    terms = agent_pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"][0]["matchExpressions"] == [
        {"key": "podiam-server", "operator": "NotIn", "values": ["true"]}
    ]
    policy = one(manifests, "NetworkPolicy")
    grpc_rule = policy["spec"]["ingress"][0]
    assert grpc_rule["from"] == [{"ipBlock": {"cidr": "10.0.0.0/16"}}]


# --- TLS -------------------------------------------------------------------------------------


def write_podiam_certs_dir(manifests: list[Manifest], directory: Path) -> Path:
    """The chart's two Secrets as the files ``podiam-certs generate`` writes."""
    files = {
        "ca.pem": ("podiam-server-tls", "ca.crt"),
        "server.pem": ("podiam-server-tls", "tls.crt"),
        "server-key.pem": ("podiam-server-tls", "tls.key"),
        "agent.pem": ("podiam-agent-tls", "tls.crt"),
        "agent-key.pem": ("podiam-agent-tls", "tls.key"),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for filename, (secret, key) in files.items():
        path = directory / filename
        path.write_bytes(secret_pem(manifests, secret, key))
        path.chmod(0o600)
    return directory


def test_generated_tls_is_a_valid_podiam_bundle(rendered, tmp_path):
    manifests = rendered["generated-tls-with-extra-names"]
    assert secret_pem(manifests, "podiam-server-tls", "ca.crt") == secret_pem(
        manifests, "podiam-agent-tls", "ca.crt"
    )
    report = check_dir(write_podiam_certs_dir(manifests, tmp_path))
    assert report.ok, report.problems

    server = x509.load_pem_x509_certificate(secret_pem(manifests, "podiam-server-tls", "tls.crt"))
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {
        "podiam-server",
        f"podiam-server.{NAMESPACE}",
        f"podiam-server.{NAMESPACE}.svc",
        SERVER_FQDN,
        "localhost",
        "kiam-server",
    }
    assert set(sans.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.0.0.9"),
    }
    agent = x509.load_pem_x509_certificate(secret_pem(manifests, "podiam-agent-tls", "tls.crt"))
    usages = agent.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in usages


def test_cert_manager_certificates_cover_the_same_names(rendered):
    manifests = rendered["cert-manager-own-ca"]
    server = one(manifests, "Certificate", "podiam-server")["spec"]
    agent = one(manifests, "Certificate", "podiam-agent")["spec"]
    assert server["secretName"] == "podiam-server-tls" and agent["secretName"] == "podiam-agent-tls"
    assert SERVER_FQDN in server["dnsNames"] and "localhost" in server["dnsNames"]
    assert server["ipAddresses"] == ["127.0.0.1"]
    assert "server auth" in server["usages"] and "client auth" in agent["usages"]
    assert server["issuerRef"] == agent["issuerRef"] == {"kind": "Issuer", "name": "podiam-ca"}
    issuer = one(rendered["cert-manager-issuer"], "Certificate", "podiam-server")["spec"]
    assert issuer["issuerRef"] == {"kind": "ClusterIssuer", "name": "corp-ca"}


@pytest.mark.parametrize("name", ["defaults", "existing-secret", "cert-manager-own-ca"])
def test_pods_mount_whole_secrets_so_rotations_arrive(rendered, name):
    """subPath mounts never see a Secret's updates; podiam reloads files that change."""
    manifests = rendered[name]
    for kind in ("Deployment", "DaemonSet"):
        pod = one(manifests, kind)["spec"]["template"]["spec"]
        for mount in pod["containers"][0]["volumeMounts"]:
            assert "subPath" not in mount
        secrets = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        expected = {"existing-secret": {"srv", "agt"}}.get(
            name, {"podiam-server-tls", "podiam-agent-tls"}
        )
        assert secrets <= expected
    # Nodes can read the Secrets their pods mount: agents mount the agent's only.
    agent_pod = one(manifests, "DaemonSet")["spec"]["template"]["spec"]
    agent_secrets = {v["secret"]["secretName"] for v in agent_pod["volumes"] if "secret" in v}
    assert agent_secrets == {"agt" if name == "existing-secret" else "podiam-agent-tls"}


def test_upgrade_keeps_the_generated_tls_material():
    """An upgrade renders against the cluster, where ``lookup`` finds the release's Secrets."""
    installed = render()
    cluster = SecretsApi()
    cluster.add_secrets(installed)
    with cluster.running() as config:
        upgraded = render(cluster=config, upgrade=True)
        again = render(cluster=config, upgrade=True)
    for name in ("podiam-server-tls", "podiam-agent-tls"):
        assert one(upgraded, "Secret", name)["data"] == one(installed, "Secret", name)["data"]
        assert one(again, "Secret", name)["data"] == one(installed, "Secret", name)["data"]
    assert f"/api/v1/namespaces/{NAMESPACE}/secrets/podiam-server-tls" in cluster.requests


def test_install_without_secrets_generates_new_material():
    cluster = SecretsApi()
    with cluster.running() as config:
        first = render(cluster=config)
        second = render(cluster=config)
    assert cluster.requests  # lookup asked, and found nothing
    pem = secret_pem(first, "podiam-server-tls", "ca.crt")
    assert pem != secret_pem(second, "podiam-server-tls", "ca.crt")


def test_half_present_secrets_are_regenerated_together():
    """With only one of the two Secrets left, reusing it would pair certificates from two CAs."""
    installed = render()
    cluster = SecretsApi()
    cluster.add_secrets([m for m in installed if m["metadata"]["name"] == "podiam-server-tls"])
    with cluster.running() as config:
        upgraded = render(cluster=config, upgrade=True)
    ca = secret_pem(upgraded, "podiam-server-tls", "ca.crt")
    assert ca != secret_pem(installed, "podiam-server-tls", "ca.crt")
    assert ca == secret_pem(upgraded, "podiam-agent-tls", "ca.crt")


# --- The server's health probe against a real server -----------------------------------------


async def run_probe(command: list[str], *, port: int, certs: Path) -> int:
    """Run the chart's exec probe as the kubelet would, with this test's port and files."""
    python, flag, script, _address, *_files = command
    assert (python, flag) == ("python", "-c")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        flag,
        script,
        f"127.0.0.1:{port}",
        str(certs / "agent.pem"),
        str(certs / "agent-key.pem"),
        str(certs / "ca.pem"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(process.wait(), timeout=20)


async def test_server_probe_passes_with_chart_certificates_and_fails_without_server(
    rendered, tmp_path
):
    manifests = rendered["defaults"]
    certs = write_podiam_certs_dir(manifests, tmp_path / "tls")
    spec = container(manifests, "Deployment")
    probe = spec["readinessProbe"]["exec"]["command"]
    assert probe == spec["livenessProbe"]["exec"]["command"]
    assert probe[3] == "127.0.0.1:8443"
    assert probe[4:] == [
        "/etc/podiam/probe/tls.crt",
        "/etc/podiam/probe/tls.key",
        "/etc/podiam/probe/ca.crt",
    ]

    async with KubeApiServer() as kube:
        kube.write_kubeconfig(str(tmp_path / "kubeconfig"))
        # The chart's own arguments, with this test's files, port and Kubernetes API.
        args = [
            *spec["args"],
            "--bind=127.0.0.1:0",
            f"--cert={certs / 'server.pem'}",
            f"--key={certs / 'server-key.pem'}",
            f"--ca={certs / 'ca.pem'}",
            f"--kubeconfig={tmp_path / 'kubeconfig'}",
            f"--role-base-arn={ROLE_BASE}",
            "--prometheus-listen-addr=",
            "--sts-endpoint=http://127.0.0.1:9",
        ]
        args.remove("--role-base-arn-autodetect")
        server = PodiamServer(parse_server_config(args, environ={}), boto_session=fake_session())
        await server.start()
        try:
            assert await run_probe(probe, port=server.port, certs=certs) == 0
        finally:
            await server.stop(grace=1)
        assert await run_probe(probe, port=server.port, certs=certs) != 0


def test_sts_economy_values_reach_their_flags(rendered):
    spec = container(rendered["sts-economy"], "Deployment")
    server = parse_server_config(spec["args"], environ=env_of(spec))
    assert server.session_name_from == "pod"
    assert server.audit_log == "/var/log/podiam/audit"
    assert (server.session_tags, server.transitive_session_tags) == (True, True)
    assert server.cluster_name == "prod-eu"
    assert (server.sts_qps, server.sts_burst) == (12.5, 30)
    default = container(rendered["defaults"], "Deployment")
    assert parse_server_config(default["args"], environ=env_of(default)).session_name_from == (
        "workload"
    )
