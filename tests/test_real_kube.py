"""What only a real control plane can show: the chart's RBAC enforced by a real API server,
denial Events as ``kubectl get events`` lists them, pods placed by the real scheduler on kwok's
fake nodes, and a control plane that leaves no process behind however it ends.

The scenarios that also hold on the test double are in test_kube_scenarios.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from certs.tls import channel_credentials
from protos import kiam_pb2, kiam_pb2_grpc
from server.app import PodiamServer
from server.config import parse_config
from tests.support.clusters import (
    ChartAccess,
    RealCluster,
    add_pods,
    api_client,
    mine,
    next_ip,
    podiam_server,
    real_cluster,
    reflecting,
    unique,
)
from tests.support.controlplane import (
    ControlPlane,
    ControlPlaneError,
    KubeClient,
    require_binaries,
    token_client,
)
from tests.support.moto_sts import fake_session
from tests.support.server import server_argv
from tests.support.waiting import eventually
from tests.test_kube_watch import RecordingSink

PERMITTED = "iam.amazonaws.com/permitted"
ROLE = "iam.amazonaws.com/role"

pytestmark = pytest.mark.timeout(300)


@pytest_asyncio.fixture(scope="module")
async def real(
    control_plane: ControlPlane, chart_access: ChartAccess
) -> AsyncIterator[RealCluster]:
    async with real_cluster(control_plane, chart_access) as cluster:
        yield cluster


@pytest_asyncio.fixture(scope="module")
async def podiam(real: RealCluster, moto_sts, tls_dirs):
    async with podiam_server(real.kubeconfig, moto_sts, tls_dirs) as server:
        yield server


async def known(podiam, namespace: str, real: RealCluster) -> None:
    """Wait until the server has seen ``namespace``: its pod and namespace watches are
    independent, and a pod seen first would be refused for an unknown namespace."""
    await eventually(lambda: namespace in podiam.server.registry.namespaces, real.patience)


# --- RBAC, proven by requests -----------------------------------------------------------------

# What a podiam component could conceivably try: every verb on what it reads and writes, and
# on what it must never touch.
NAMESPACED = ("pods", "events", "secrets", "configmaps", "serviceaccounts")
CLUSTER_SCOPED = ("namespaces", "nodes")
VERBS = ("get", "list", "watch", "create", "patch", "delete")
PROBE = "podiam-probe"  # the name of the object each request is about; none exists


def granted(manifests: list[dict], role_kind: str, resource: str, verb: str) -> bool:
    """Whether the chart's rendered ``role_kind`` objects grant ``verb`` on core ``resource``."""
    for role in manifests:
        if role["kind"] != role_kind:
            continue
        for rule in role.get("rules", []):
            if "" not in rule.get("apiGroups", []):
                continue
            if rule.get("resourceNames") and PROBE not in rule["resourceNames"]:
                continue  # grants only named objects, never the probe
            if {resource, "*"} & set(rule.get("resources", [])) and {verb, "*"} & set(
                rule.get("verbs", [])
            ):
                return True
    return False


async def attempt(client: KubeClient, resource: str, verb: str) -> int:
    """The HTTP status of one ``verb`` on ``resource``. The API server authorises before it
    looks at the body or the object, so a refusal is a 403 whatever is sent."""
    scope = "" if resource in CLUSTER_SCOPED else "namespaces/default/"
    base = f"/api/v1/{scope}{resource}"
    one = f"{base}/{PROBE}"
    if verb == "get":
        answer = await client.get(one)
    elif verb == "list":
        answer = await client.get(base, limit="1")
    elif verb == "watch":
        answer = await client.get(base, watch="1", timeoutSeconds="1")
    elif verb == "create":
        answer = await client.post(base, {"metadata": {"name": PROBE}})
    elif verb == "patch":
        answer = await client.merge_patch(one, {"metadata": {"labels": {"probe": "x"}}})
    else:
        answer = await client.delete(one)
    return answer.status


async def test_agent_service_account_is_refused_everything(
    control_plane: ControlPlane, chart_access: ChartAccess
):
    async with token_client(control_plane, chart_access.agent_token) as agent:
        statuses = {
            (resource, verb): await attempt(agent, resource, verb)
            for resource in NAMESPACED + CLUSTER_SCOPED
            for verb in VERBS
        }
    assert {key: status for key, status in statuses.items() if status != 403} == {}


async def test_server_service_account_can_do_what_the_chart_grants_and_nothing_else(
    control_plane: ControlPlane, chart_access: ChartAccess
):
    role_kind = "ClusterRole"
    refused, allowed = {}, {}
    async with token_client(control_plane, chart_access.server_token) as server:
        for resource in NAMESPACED + CLUSTER_SCOPED:
            for verb in VERBS:
                if not granted(chart_access.manifests, role_kind, resource, verb):
                    refused[(resource, verb)] = await attempt(server, resource, verb)
                elif verb in ("get", "list", "watch"):
                    allowed[(resource, verb)] = await attempt(server, resource, verb)
                else:
                    # Granted writes are exercised for real by the scenarios (Events); here
                    # the API server is asked whether it would allow them, without writing.
                    review = {
                        "apiVersion": "authorization.k8s.io/v1",
                        "kind": "SelfSubjectAccessReview",
                        "spec": {
                            "resourceAttributes": {
                                "namespace": "" if resource in CLUSTER_SCOPED else "default",
                                "verb": verb,
                                "resource": resource,
                            }
                        },
                    }
                    answer = await server.post(
                        "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", review
                    )
                    allowed[(resource, verb)] = 200 if answer.body["status"]["allowed"] else 403

    assert ("pods", "watch") in allowed and ("events", "create") in allowed
    assert {key: s for key, s in refused.items() if s != 403} == {}
    assert {key: s for key, s in allowed.items() if s == 403} == {}


async def test_server_with_the_agents_token_never_becomes_ready(
    control_plane: ControlPlane, chart_access: ChartAccess, moto_sts, tls_dirs, caplog
):
    kubeconfig = control_plane.kubeconfig("agent-token", token=chart_access.agent_token)
    argv = server_argv(kubeconfig=kubeconfig, sts=moto_sts, tls=tls_dirs)
    server = PodiamServer(parse_config(argv, environ={}), boto_session=fake_session())
    caplog.set_level(logging.WARNING)
    starting = asyncio.create_task(server.start())
    try:
        await eventually(lambda: "HTTP 403" in caplog.text or starting.done(), 30)
        assert not starting.done(), "a server that cannot list pods must not serve"
        assert f'User "{chart_access.agent_account}" cannot list resource' in caplog.text
    finally:
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        await server.stop(grace=0)


async def test_podiam_server_process_with_the_chart_token_syncs_serves_and_stops(
    real: RealCluster, control_plane: ControlPlane, chart_access: ChartAccess, moto_sts, tls_dirs
):
    ns = unique("process")
    await real.add_namespace(ns, annotations={PERMITTED: "app-.*"})
    ip = next_ip()
    await real.add_pod(ns, "web", ip=ip, annotations={ROLE: "app-web"})
    # Straight to the API server, as a pod's in-cluster configuration would be.
    kubeconfig = control_plane.kubeconfig("server-process", token=chart_access.server_token)
    argv = server_argv(kubeconfig=kubeconfig, sts=moto_sts, tls=tls_dirs)
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", *argv, "--json-log",
        stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        lines: list[str] = []
        while not lines or "serving gRPC" not in lines[-1]:
            line = await asyncio.wait_for(process.stderr.readline(), 60)
            assert line, "podiam-server exited early: " + "".join(lines)
            lines.append(line.decode())
        port = int(json.loads(lines[-1])["message"].rsplit(":", 1)[1])
        assert any("synced" in line for line in lines)

        channel = grpc.aio.secure_channel(f"localhost:{port}", channel_credentials(tls_dirs.agent))
        async with channel:
            creds = await kiam_pb2_grpc.KiamServiceStub(channel).GetPodCredentials(
                kiam_pb2.GetPodCredentialsRequest(ip=ip, role="app-web")
            )
        assert creds.code == "Success"

        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.stderr.read(), 30)
        assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# --- what an operator sees --------------------------------------------------------------------


async def test_denial_event_is_listed_by_kubectl_get_events(real: RealCluster, podiam):
    ns = unique("kubectl-events")
    await real.add_namespace(ns, annotations={PERMITTED: "app-.*"})
    await known(podiam, ns, real)
    ip = next_ip()
    await real.add_pod(ns, "sneaky", ip=ip, annotations={ROLE: "cluster-admin"})
    await eventually(lambda: podiam.server.registry.lookup(ip).pod is not None, real.patience)
    async with podiam.channel() as channel:
        stub = podiam.stub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GetPodCredentials(
                kiam_pb2.GetPodCredentialsRequest(ip=ip, role="cluster-admin")
            )
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    await podiam.server.recorder.drain()

    selector = "involvedObject.name=sneaky,reason=PodiamNotPermitted"
    listed = real.plane.kubectl(
        "get", "events", "-n", ns, "--field-selector", selector, "-o", "json"
    )
    assert listed.returncode == 0, listed.stderr
    events = json.loads(listed.stdout)["items"]
    assert [(e["type"], e["reason"], e["source"]["component"]) for e in events] == [
        ("Warning", "PodiamNotPermitted", "podiam-server")
    ]
    table = real.plane.kubectl("get", "events", "-n", ns).stdout
    assert "PodiamNotPermitted" in table and "pod/sneaky" in table


async def test_pod_placed_by_the_scheduler_on_a_fake_node_gets_credentials(
    real: RealCluster, podiam
):
    ns = unique("scheduled")
    await real.add_namespace(ns, annotations={PERMITTED: "app-.*"})
    await known(podiam, ns, real)
    pod = {
        "metadata": {"name": "batch", "annotations": {ROLE: "app-batch"}},
        "spec": {"containers": [{"name": "app", "image": "podiam.test/app:none"}]},
    }
    created = await real.admin.post(f"/api/v1/namespaces/{ns}/pods", pod)
    assert created.ok, created.body

    async def started() -> dict | None:
        body = (await real.admin.get(f"/api/v1/namespaces/{ns}/pods/batch")).body
        return body if body.get("status", {}).get("podIP") else None

    await eventually(started, real.patience)
    placed = await started()
    assert placed["spec"]["nodeName"] in real.plane.node_names  # the scheduler chose it
    ip = placed["status"]["podIP"]
    assert ip.startswith("10.244.")  # kwok gave it one from the node's pod CIDR

    await eventually(lambda: podiam.server.registry.lookup(ip).pod is not None, real.patience)
    async with podiam.channel() as channel:
        creds = await podiam.stub(channel).GetPodCredentials(
            kiam_pb2.GetPodCredentialsRequest(ip=ip, role="app-batch")
        )
    assert creds.code == "Success"


# --- where the real API differs from the double -----------------------------------------------


async def test_watch_cache_outlives_compaction_so_a_resumed_watch_needs_no_relist(
    real: RealCluster,
):
    # The double answers a watch from a compacted version with 410 (test_kube_watch.py), as an
    # API server without its watch cache would. With it (the default, and EKS's), watches are
    # served from the cache's own history, which etcd's compaction does not touch; the
    # reflector is right either way, and here it needs no relist.
    ns = unique("cached")
    await real.add_namespace(ns)
    await add_pods(real, ns, "a")
    sink = RecordingSink()
    async with api_client(real) as api, reflecting(real, api, sink):
        with real.proxy.down():
            await add_pods(real, ns, "b")
            await real.delete_pod(ns, "a")
            await real.compact()
        await eventually(lambda: mine(sink, ns) == {f"{ns}/b"}, real.patience)
    assert sink.relists_begun == 1


# --- the control plane itself -----------------------------------------------------------------


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for every purpose but the process table.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ", 1)[1][0] != "Z"


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                if text.encode() in cmdline.read():
                    found.append(int(entry))
        except OSError:
            continue
    return [pid for pid in found if pid != os.getpid() and alive(pid)]


def test_stopped_control_plane_leaves_no_process(tmp_path: Path):
    plane = ControlPlane(require_binaries(), tmp_path / "plane", nodes=1)
    with plane:
        pids = plane.pids()
        assert len(pids) == 5 and all(alive(pid) for pid in pids)
        assert plane.kubectl("get", "nodes").returncode == 0

    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in pids if alive(pid)] == []
    assert processes_mentioning(str(tmp_path)) == []


def test_control_plane_that_fails_to_start_says_why_and_leaves_no_process(tmp_path: Path):
    plane = ControlPlane(
        require_binaries(), tmp_path / "plane", nodes=1, apiserver_args=["--no-such-flag"]
    )
    with pytest.raises(ControlPlaneError, match="kube-apiserver exited") as error:
        plane.start()

    assert "no-such-flag" in str(error.value)
    assert plane.pids() and not any(alive(pid) for pid in plane.pids())
    assert processes_mentioning(str(tmp_path)) == []
