"""Node binding: how the server tells which node an agent runs on, and turning it off."""

from __future__ import annotations

import grpc
import pytest

from protos import kiam_pb2
from server.service import peer_ip
from tests.support.pods import add_pod
from tests.support.waiting import eventually


@pytest.mark.parametrize(
    ("peer", "ip"),
    [
        ("ipv4:10.0.0.1:5050", "10.0.0.1"),
        ("ipv6:[fd00::1]:5050", "fd00::1"),
        ("ipv6:%5Bfd00::1%5D:5050", "fd00::1"),
        ("ipv6:[::ffff:10.0.0.1]:5050", "10.0.0.1"),  # a dual-stack listener's IPv4 caller
        ("unix:/run/podiam.sock", None),
        ("ipv4:garbage:1", None),
    ],
)
def test_peer_addresses_are_read_as_node_ips(peer, ip):
    assert peer_ip(peer) == ip


@pytest.fixture(scope="module")
def namespaces():
    return {"apps": ".*", "default": None}


@pytest.fixture(scope="module")
def server_flags():
    return ["--no-node-binding"]


async def test_without_node_binding_any_agent_may_ask_for_any_pod(podiam):
    add_pod(podiam.kube, "apps", "far", "far-role", ip="10.7.0.1", host_ip="10.99.0.9")
    await eventually(lambda: podiam.server.registry.lookup("10.7.0.1").pod is not None)
    async with podiam.channel() as channel:
        stub = podiam.stub(channel)
        request = kiam_pb2.GetPodCredentialsRequest(ip="10.7.0.1", role="far-role")
        assert (await stub.GetPodCredentials(request)).access_key_id
        stream = stub.WatchNode(kiam_pb2.WatchNodeRequest(host_ip="10.99.0.9"))
        snapshot = await stream.read()
        assert [pod.ip for pod in snapshot.pods] == ["10.7.0.1"]
        stream.cancel()


async def test_without_node_binding_the_startup_taint_follows_the_address_the_agent_claims(
    podiam,
):
    # Peer addresses are not node addresses where node binding is off (a proxy, NAT), so the
    # node must carry the address the agent says it serves: a misconfigured agent is caught,
    # though a malicious one is not, as with every other check under --no-node-binding.
    taint = {"key": "podiam.io/agent-not-ready", "value": "true", "effect": "NoExecute"}
    podiam.kube.add_node("far-node", internal_ip="10.99.0.9", taints=[taint])
    async with podiam.channel() as channel:
        stub = podiam.stub(channel)

        def report(host_ip: str):
            return stub.ReportNodeReady(
                kiam_pb2.NodeReadyReport(
                    node_name="far-node", host_ip=host_ip,
                    redirect_installed=True, snapshot_applied=True,
                )
            )  # fmt: skip

        with pytest.raises(grpc.aio.AioRpcError) as error:
            await report("10.99.0.8")
        assert error.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert podiam.kube.taints("far-node") == [taint]
        assert (await report("10.99.0.9")).outcome == "scheduled"
    await eventually(lambda: podiam.kube.taints("far-node") == [])
