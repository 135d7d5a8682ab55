"""Each denial is reported once, by the part of the server that decides it.

A pod's own denial (its role, its namespace's ``permitted``) is decided when its grant is, and
reported then by the registry; asking for the pod's credentials again and again does not report
it again. Denials that depend on the request — the caller is on another node, or asks for
another role — are reported by the service, for each request that makes them. Reports are
counted from the Event recorder's own metric (every report ends in exactly one of its results
once the queue is drained), Events in the Kubernetes API test server.
"""

from __future__ import annotations

import itertools

import grpc
import pytest
from prometheus_client import REGISTRY

from protos import kiam_pb2
from tests.support.kubeapi import KubeApiServer
from tests.support.waiting import eventually

PERMITTED = "iam.amazonaws.com/permitted"
ROLE = "iam.amazonaws.com/role"
NODE = "127.0.0.1"  # the test client connects from here
OTHER_NODE = "10.99.0.1"
_ips = (f"10.77.{n // 250}.{n % 250 + 1}" for n in itertools.count())
RESULTS = ("created", "exists", "suppressed", "dropped", "failed")


@pytest.fixture(scope="module")
def namespaces() -> dict[str, str | None]:
    return {"apps": "app-.*", "closed": None}


def add_pod(kube: KubeApiServer, namespace: str, name: str, role: str, host_ip: str = NODE) -> str:
    ip = next(_ips)
    kube.add_pod(namespace, name, ip=ip, host_ip=host_ip, annotations={ROLE: role})
    return ip


async def reports(podiam) -> float:
    """Denials reported so far (each enqueue ends in exactly one result once drained)."""
    await podiam.server.recorder.drain()
    return sum(
        REGISTRY.get_sample_value("podiam_kube_events_total", {"result": result}) or 0.0
        for result in RESULTS
    )


def events(kube: KubeApiServer, name: str) -> list[str]:
    return [e["reason"] for e in kube.events if e["involvedObject"]["name"] == name]


async def ask(stub, ip: str, role: str, times: int) -> set[grpc.StatusCode]:
    codes = set()
    for _ in range(times):
        request = kiam_pb2.GetPodCredentialsRequest(ip=ip, role=role)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.GetPodCredentials(request, timeout=5)
        codes.add(error.value.code())
    return codes


@pytest.mark.parametrize(
    ("namespace", "role", "event"),
    [("apps", "evil-x", "PodiamNotPermitted"), ("closed", "app-x", "PodiamNoPermitted")],
)
async def test_pod_level_denial_is_reported_once_however_often_the_pod_asks(
    podiam, kube, stub, namespace, role, event
):
    name = f"asks-often-{namespace}"
    ip = add_pod(kube, namespace, name, role)
    await eventually(lambda: podiam.server.registry.lookup(ip).pod is not None)
    await eventually(lambda: events(kube, name))  # reported when the grant was decided
    before = await reports(podiam)

    assert await ask(stub, ip, role, times=4) == {grpc.StatusCode.PERMISSION_DENIED}

    assert await reports(podiam) == before
    assert events(kube, name) == [event]


async def test_request_for_another_role_is_reported_for_each_request(podiam, kube, stub):
    ip = add_pod(kube, "apps", "greedy", "app-small")
    await eventually(lambda: podiam.server.registry.lookup(ip).pod is not None)
    before = await reports(podiam)

    assert await ask(stub, ip, "app-big", times=3) == {grpc.StatusCode.PERMISSION_DENIED}

    assert await reports(podiam) == before + 3
    assert events(kube, "greedy") == ["PodiamRoleMismatch"]  # the recorder keeps one Event


async def test_request_from_another_node_is_reported_beside_the_pods_own_denial(podiam, kube, stub):
    ip = add_pod(kube, "apps", "elsewhere", "evil-y", host_ip=OTHER_NODE)
    await eventually(lambda: podiam.server.registry.lookup(ip).pod is not None)
    await eventually(lambda: events(kube, "elsewhere"))
    before = await reports(podiam)

    assert await ask(stub, ip, "evil-y", times=2) == {grpc.StatusCode.PERMISSION_DENIED}

    assert await reports(podiam) == before + 2
    assert sorted(events(kube, "elsewhere")) == ["PodiamNodeMismatch", "PodiamNotPermitted"]
