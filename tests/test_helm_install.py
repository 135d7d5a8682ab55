"""``helm install`` of charts/podiam into a real Kubernetes control plane, with Helm's own Go SDK
(helm_python): what tests/test_chart.py only reads from the rendered YAML, shown by the API
server, the controller manager, the scheduler and kwok's fake kubelets acting on it.

The cluster is this module's own (not the session's): it has the node groups the README
describes — workers, a new worker still carrying the startup taint, and dedicated server nodes
labelled and tainted ``podiam-server=true:NoExecute`` — and a DaemonSet on every node would
disturb the other modules' pod counts. The release namespace carries the Pod Security labels
the README recommends, read from the README itself, so the two cannot drift apart.

Nothing here runs podiam's processes: kwok's kubelets start no containers. What is shown is
what Kubernetes makes of the chart: the objects exist, admission accepts them, and each pod
lands where the chart says, and only there.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml

from tests.support import helm
from tests.support.controlplane import (
    KWOK_NODE_ANNOTATION,
    ControlPlane,
    running_control_plane,
)

pytestmark = pytest.mark.timeout(600)

README = Path(__file__).resolve().parents[1] / "README.md"
RELEASE = "podiam"
NAMESPACE = "podiam"
SERVER_LABEL = ("podiam-server", "true")  # values.yaml server.dedicatedNodes
SERVER_TAINT = {"key": "podiam-server", "value": "true", "effect": "NoExecute"}
STARTUP_TAINT = {"key": "podiam.io/agent-not-ready", "value": "true", "effect": "NoExecute"}
WORKERS = ["worker-0", "worker-1", "worker-2"]
NEW_WORKER = "worker-new"  # joined, its agent has not reported yet: still tainted
SERVER_NODES = ["server-0", "server-1"]
ALL_NODES = [*WORKERS, NEW_WORKER, *SERVER_NODES]
SERVER_SELECTOR = "app.kubernetes.io/name=podiam,app.kubernetes.io/component=server"
AGENT_SELECTOR = "app.kubernetes.io/name=podiam,app.kubernetes.io/component=agent"
PATIENCE = 120.0  # seconds; controllers on a loaded two-core machine


def readme_pod_security_labels() -> dict[str, str]:
    """The namespace labels the README's install section recommends."""
    found = dict(re.findall(r"(pod-security\.kubernetes\.io/\w+)=(\w+)", README.read_text()))
    assert set(found) == {
        f"pod-security.kubernetes.io/{mode}" for mode in ("enforce", "warn", "audit")
    }, f"the README's Pod Security labels changed: {found}"
    return found


def until(check: Callable[[], Any], what: str, timeout: float = PATIENCE) -> Any:
    """Poll ``check`` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not in {timeout:.0f} s: {what}")
        time.sleep(0.5)


def get(plane: ControlPlane, *args: str) -> dict[str, Any]:
    done = plane.kubectl("get", *args, "-o", "json")
    assert done.returncode == 0, f"kubectl get {' '.join(args)}: {done.stderr}"
    return json.loads(done.stdout)


def pods(plane: ControlPlane, selector: str, namespace: str = NAMESPACE) -> list[dict]:
    return get(plane, "pods", "-n", namespace, "-l", selector)["items"]


def running_on(items: list[dict]) -> list[str]:
    """The nodes of the pods kwok's kubelet reports Running, sorted (one per pod)."""
    return sorted(
        p["spec"]["nodeName"] for p in items if p.get("status", {}).get("phase") == "Running"
    )


def apply(plane: ControlPlane, objects: list[dict]) -> None:
    done = plane.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objects))
    assert done.returncode == 0, f"kubectl apply: {done.stderr}"


def node(name: str, *, labels: dict[str, str] | None = None, taints: list[dict] = ()) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {KWOK_NODE_ANNOTATION: "fake"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                **(labels or {}),
            },
        },
        "spec": {"taints": list(taints)},
    }


def namespace(name: str, labels: dict[str, str]) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def secrets(plane: ControlPlane) -> dict[str, dict[str, Any]]:
    """The chart's TLS Secrets: name to (uid, data)."""
    items = get(plane, "secrets", "-n", NAMESPACE, "-l", "app.kubernetes.io/name=podiam")["items"]
    return {
        s["metadata"]["name"]: {"uid": s["metadata"]["uid"], "data": s["data"]}
        for s in items
        if s["type"] == "kubernetes.io/tls"
    }


# --------------------------------------------------------------------------------------------
# The cluster and the release.


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    with running_control_plane(tmp_path_factory.mktemp("helm-plane"), nodes=0) as plane:
        dedicated = dict([SERVER_LABEL])
        apply(
            plane,
            [node(name) for name in WORKERS]
            + [node(NEW_WORKER, taints=[STARTUP_TAINT])]
            + [
                node(name, labels=dedicated, taints=[SERVER_TAINT, STARTUP_TAINT])
                for name in SERVER_NODES
            ],
        )

        def all_ready() -> bool:
            items = get(plane, "nodes")["items"]
            ready = {
                n["metadata"]["name"]
                for n in items
                if any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in n.get("status", {}).get("conditions", [])
                )
            }
            return ready >= set(ALL_NODES)

        until(all_ready, "kwok reports every node Ready")
        # kwok gives every node its one --node-ip, loopback, which an EndpointSlice may not
        # hold: each node gets an address of its own, as on EKS, before any pod runs there.
        for index, name in enumerate(ALL_NODES):
            address = {"type": "InternalIP", "address": f"10.0.0.{index + 1}"}
            done = plane.kubectl(
                "patch", "node", name, "--subresource=status", "--type=merge",
                "-p", json.dumps({"status": {"addresses": [address]}}),
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
        yield plane


@pytest.fixture(scope="module")
def helm_config(plane: ControlPlane) -> Iterator[helm_python.Config]:
    with helm_python.Config(
        kubeconfig_path=str(plane.admin_kubeconfig), namespace=NAMESPACE
    ) as config:
        yield config


@pytest.fixture(scope="module")
def release(plane: ControlPlane, helm_config: helm_python.Config) -> dict[str, Any]:
    """``helm install podiam ./charts/podiam -n podiam --wait``, into the namespace labelled
    as the README says; returns Helm's release summary."""
    apply(plane, [namespace(NAMESPACE, readme_pod_security_labels())])
    # "watcher": Helm waits, as `--wait` does, until the Deployment and the DaemonSet report
    # their pods ready, i.e. until the controllers, the scheduler and kwok have done their part.
    return helm_config.install(str(helm.CHART), RELEASE, {}, wait="watcher", timeout=300)


# --------------------------------------------------------------------------------------------
# What the install made.


def test_helm_installs_the_chart_and_records_a_deployed_release(
    release: dict[str, Any], helm_config: helm_python.Config
) -> None:
    status = helm_config.status(RELEASE)
    assert status["status"] == "deployed", {k: v for k, v in status.items() if k != "manifest"}
    assert status["revision"] == 1
    assert status["namespace"] == NAMESPACE
    assert release["revision"] == 1


def test_an_agent_pod_runs_on_every_node_tainted_or_not(
    plane: ControlPlane, release: dict[str, Any]
) -> None:
    # The agent tolerates everything: the server nodes' taint and the startup taint included,
    # since it is the agent that gets the startup taint removed.
    agents = until(
        lambda: (found := pods(plane, AGENT_SELECTOR)) and len(running_on(found)) >= 6 and found,
        "an agent Running on each node",
    )
    assert running_on(agents) == sorted(ALL_NODES)
    daemonset = get(plane, "daemonset", "-n", NAMESPACE, "-l", AGENT_SELECTOR)["items"][0]
    assert daemonset["status"]["desiredNumberScheduled"] == len(ALL_NODES)
    assert daemonset["status"]["numberReady"] == len(ALL_NODES)


def test_server_pods_land_only_on_the_labelled_and_tainted_server_nodes(
    plane: ControlPlane, release: dict[str, Any]
) -> None:
    servers = pods(plane, SERVER_SELECTOR)
    # One per server node (required anti-affinity), none on a worker although the workers are
    # untainted and have room.
    assert running_on(servers) == SERVER_NODES
    assert len(servers) == 2


def test_the_taints_keep_other_pods_off_the_server_and_new_nodes(
    plane: ControlPlane, release: dict[str, Any]
) -> None:
    # The control for the test above: this scheduler does honour the taints, so the server
    # landing on the server nodes is the chart's nodeSelector and tolerations at work, and
    # ordinary pods cannot reach the nodes whose role may assume every pod's role.
    bystanders = "bystander"
    apply(plane, [namespace(bystanders, {})])
    until(
        lambda: plane.kubectl("get", "serviceaccount", "default", "-n", bystanders).returncode == 0,
        "the bystander namespace's default ServiceAccount",
    )
    done = plane.kubectl(
        "create", "deployment", "app", "-n", bystanders, "--replicas", "9",
        "--image", "podiam.test/app:none",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    placed = until(
        lambda: len(running_on(found := pods(plane, "app=app", bystanders))) == 9 and found,
        "nine bystander pods Running",
    )
    assert set(running_on(placed)) <= set(WORKERS)
    assert set(running_on(placed)) == set(WORKERS)  # spread: the workers were all eligible


def test_the_disruption_budget_covers_both_server_pods(
    plane: ControlPlane, release: dict[str, Any]
) -> None:
    def counted() -> dict | None:
        items = get(plane, "poddisruptionbudgets", "-n", NAMESPACE)["items"]
        assert [b["metadata"]["name"] for b in items] == ["podiam-server"]
        status = items[0].get("status", {})
        return status if status.get("expectedPods") == 2 else None

    status = until(counted, "the disruption controller counts the server pods")
    assert status["currentHealthy"] == 2
    assert status["disruptionsAllowed"] == 1  # maxUnavailable: 1


def test_the_headless_server_service_resolves_to_both_server_pods(
    plane: ControlPlane, release: dict[str, Any]
) -> None:
    services = get(plane, "services", "-n", NAMESPACE)["items"]
    assert [s["metadata"]["name"] for s in services] == ["podiam-server"]
    service = services[0]
    assert service["spec"]["clusterIP"] == "None"
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "grpc": 8443,
        "metrics": 9621,
    }

    def endpoint_pods() -> list[str]:
        slices = get(
            plane, "endpointslices", "-n", NAMESPACE,
            "-l", "kubernetes.io/service-name=podiam-server",
        )["items"]  # fmt: skip
        return sorted(
            e["targetRef"]["name"]
            for s in slices
            for e in s.get("endpoints") or []
            if e.get("conditions", {}).get("ready")
        )

    servers = sorted(p["metadata"]["name"] for p in pods(plane, SERVER_SELECTOR))
    until(lambda: endpoint_pods() == servers, "the Service's endpoints are the server pods")


# --------------------------------------------------------------------------------------------
# Pod Security admission.


def test_pod_security_admission_accepts_every_object_without_a_warning(
    plane: ControlPlane, release: dict[str, Any]
) -> None:
    # Warnings come back on the API's answers, and kubectl prints them: a dry run of the
    # release's own manifest (as Helm stored it) in the release namespace shows them. Server-side
    # apply, so that kubectl adds no client-side warnings of its own.
    done = plane.kubectl(
        "apply", "--server-side", "--force-conflicts", "--dry-run=server",
        "-n", NAMESPACE, "-f", "-", input=release["manifest"],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr, done.stderr
    assert "PodSecurity" not in done.stderr, done.stderr


def test_pod_security_admission_checked_every_pod_of_the_release_and_found_nothing(
    plane: ControlPlane, release: dict[str, Any]
) -> None:
    # The audit log records, for each pod created, which Pod Security policy admission
    # evaluated it against: proof that the plugin is on and saw every one of them.
    created = [
        r
        for r in plane.audit_records()
        if r.get("verb") == "create"
        and r.get("stage") == "ResponseComplete"
        and (r.get("objectRef") or {}).get("resource") == "pods"
        and (r.get("objectRef") or {}).get("namespace") == NAMESPACE
        and not (r.get("objectRef") or {}).get("subresource")
    ]
    assert len(created) >= len(ALL_NODES) + 2, "fewer pod creations than agents and servers"
    for record in created:
        annotations = record.get("annotations") or {}
        assert record["responseStatus"]["code"] == 201, record["responseStatus"]
        assert annotations.get("pod-security.kubernetes.io/enforce-policy", "").startswith(
            "privileged:"
        ), annotations
        assert "pod-security.kubernetes.io/audit-violations" not in annotations, annotations


def test_a_namespace_at_the_baseline_level_refuses_the_agent_pods(
    plane: ControlPlane, release: dict[str, Any]
) -> None:
    # The control: admission is not merely present but enforcing, so the release namespace's
    # labels are what let the chart's pods in. The release's DaemonSet, copied as it is into a
    # namespace at "baseline", gets no pod: the host network and NET_ADMIN are refused.
    strict = "podiam-baseline"
    apply(plane, [namespace(strict, {"pod-security.kubernetes.io/enforce": "baseline"})])
    daemonset = helm.one(list(yaml.safe_load_all(release["manifest"])), "DaemonSet")
    daemonset["metadata"]["namespace"] = strict
    account = helm.one(list(yaml.safe_load_all(release["manifest"])), "ServiceAccount",
                       daemonset["spec"]["template"]["spec"]["serviceAccountName"])  # fmt: skip
    account["metadata"]["namespace"] = strict
    warned = plane.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([account, daemonset]))
    assert warned.returncode == 0, warned.stderr
    # Workload objects are only warned about; their pods are refused.
    assert "would violate PodSecurity" in warned.stderr, warned.stderr

    def refused() -> list[str]:
        events = get(plane, "events", "-n", strict)["items"]
        return [
            e["message"]
            for e in events
            if e.get("reason") == "FailedCreate" and "violates PodSecurity" in e["message"]
        ]

    messages = until(refused, "the DaemonSet controller's FailedCreate event")
    assert "hostNetwork" in messages[0], messages[0]
    assert pods(plane, AGENT_SELECTOR, strict) == []


# --------------------------------------------------------------------------------------------
# Upgrade (last: it changes the release).


def test_helm_upgrade_keeps_the_generated_certificates_and_the_placement(
    plane: ControlPlane, release: dict[str, Any], helm_config: helm_python.Config
) -> None:
    before = secrets(plane)
    assert set(before) == {"podiam-server-tls", "podiam-agent-tls"}
    old_servers = {p["metadata"]["name"] for p in pods(plane, SERVER_SELECTOR)}

    # A change that rolls the server pods, with Helm reading the live Secrets back (lookup).
    upgraded = helm_config.upgrade(
        str(helm.CHART), RELEASE, {"server": {"logLevel": "debug"}}, wait="watcher", timeout=300
    )
    assert upgraded["revision"] == 2
    assert helm_config.status(RELEASE)["status"] == "deployed"

    after = secrets(plane)
    assert after == before  # same objects (uid), same certificates and keys, byte for byte
    server_cert = base64.b64decode(after["podiam-server-tls"]["data"]["tls.crt"])
    assert server_cert.startswith(b"-----BEGIN CERTIFICATE-----")

    def rolled() -> list[dict] | None:
        found = pods(plane, SERVER_SELECTOR)
        names = {p["metadata"]["name"] for p in found}
        done = not names & old_servers and len(running_on(found)) == 2 and len(found) == 2
        return found if done else None

    servers = until(rolled, "the server pods replaced by the upgrade")
    assert running_on(servers) == SERVER_NODES
    for pod in servers:
        assert "--log-level=debug" in pod["spec"]["containers"][0]["args"]
