"""Policy input written by a hostile namespace admin, against a real server (real Kubernetes
list/watch API test server, moto as STS, mutual-TLS gRPC) and a real agent: no annotation can
stall the server for other namespaces, name a role other than the one it spells, reach another
AWS account, or turn an ambiguous IP into a guess.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from prometheus_client import REGISTRY

from agent.client import ServerClient, ServerConnection
from agent.lookup import PodLookup
from agent.refusal import Refused
from agent.state import NodeState
from protos import kiam_pb2
from tests.support.agent import pod_session
from tests.support.objects import PERMITTED
from tests.support.pods import NODE, add_pod, next_pod_ip
from tests.support.server import BASE_ARN, indexed, refused
from tests.support.waiting import eventually

CREDS = "/latest/meta-data/iam/security-credentials/"
LISTED_ACCOUNT = "111111111111"
UNLISTED_ACCOUNT = "999999999999"
# 500 characters, valid as IAM defines roles (a 435-character path segment and a 64-character
# name), and the worst case for a backtracking engine matching "(a+)+$": all a's, then not.
HOSTILE_ROLE = "a" * 435 + "/" + "a" * 63 + "="


@pytest.fixture(scope="module")
def namespaces():
    return {"apps": "app-.*", "anything": ".*"}


@pytest.fixture(scope="module")
def server_flags():
    return ["--allowed-account", LISTED_ACCOUNT]


def credentials_request(ip: str, role: str) -> kiam_pb2.GetPodCredentialsRequest:
    return kiam_pb2.GetPodCredentialsRequest(ip=ip, role=role)


async def agent_get(agent, ip: str, path: str) -> tuple[int, str]:
    async with pod_session(ip) as http:
        async with http.get(f"http://{NODE}:{agent.port}{path}") as response:
            return response.status, await response.text()


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# ---- a pattern that would stall a backtracking engine ------------------------------------------


async def test_pathological_pattern_does_not_delay_another_namespaces_new_pod(podiam, kube, stub):
    # The issue's measurement: with Python's re, three such pods held the event loop for minutes
    # and a pod in another namespace got its first answer after 151 s, as a 504. With RE2 every
    # decision below is made at once; were matching backtracking, this test would never end
    # (pytest-timeout fails it) rather than merely run slow.
    kube.add_namespace("hostile", annotations={PERMITTED: "(a+)+$"})
    hostile = [add_pod(kube, "hostile", f"evil-{n}", HOSTILE_ROLE) for n in range(3)]
    hostile += [add_pod(kube, "hostile", f"evil-short-{n}", "a" * 30 + "=") for n in range(3)]
    calm = add_pod(kube, "apps", "calm", "app-calm")

    await indexed(podiam, calm)
    creds = await stub.GetPodCredentials(credentials_request(calm, "app-calm"), timeout=5)
    assert creds.access_key_id

    record = podiam.server.registry.namespaces["hostile"]
    assert record.pattern is not None and record.pattern.engine == "re2"
    for ip in hostile:
        await indexed(podiam, ip)
        role = podiam.server.registry.lookup(ip).pod.role
        error = await refused(stub.GetPodCredentials(credentials_request(ip, role), timeout=5))
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "is not permitted" in error.details()


async def test_uncompilable_pattern_permits_nothing_and_records_namespace_event(podiam, kube, stub):
    before = metric("podiam_namespaces_invalid_permitted")
    namespace = kube.add_namespace("backref", annotations={PERMITTED: r"(app)-\1"})
    ip = add_pod(kube, "backref", "echo", "app-app")
    await indexed(podiam, ip)

    error = await refused(stub.GetPodCredentials(credentials_request(ip, "app-app"), timeout=5))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "RE2 cannot compile" in error.details()
    assert metric("podiam_namespaces_invalid_permitted") == before + 1

    def namespace_events():
        return [
            e
            for e in kube.events
            if e["involvedObject"]["kind"] == "Namespace"
            and e["involvedObject"]["name"] == "backref"
        ]

    await eventually(namespace_events)
    [event] = namespace_events()
    assert event["metadata"]["namespace"] == "backref"
    assert event["involvedObject"]["uid"] == namespace["metadata"]["uid"]
    assert event["reason"] == "PodiamInvalidPermitted" and event["type"] == "Warning"
    assert "RE2 cannot compile" in event["message"] and "nothing is permitted" in event["message"]

    # The same pattern again (any other change to the namespace) is not a new Event.
    kube.update_namespace("backref", labels={"team": "echo"})
    await eventually(lambda: podiam.server.registry.namespaces["backref"] is not None)
    await podiam.server.recorder.drain()
    assert len(namespace_events()) == 1

    kube.update_namespace("backref", annotations={PERMITTED: "app-app"})
    await eventually(lambda: podiam.server.registry.lookup(ip).grant.identity is not None)
    assert metric("podiam_namespaces_invalid_permitted") == before
    assert (await stub.GetPodCredentials(credentials_request(ip, "app-app"))).access_key_id


# ---- roles that are not what they spell -----------------------------------------------------


@pytest.mark.parametrize("role", ["app-x/../admin", "app-x/./admin", "app-x//admin"])
async def test_role_with_dot_dot_segment_is_refused_not_served_as_another_role(
    podiam, kube, stub, moto_sts, role
):
    ip = add_pod(kube, "apps", f"climber-{abs(hash(role)) % 10**6}", role)
    await indexed(podiam, ip)
    error = await refused(stub.GetPodCredentials(credentials_request(ip, role), timeout=5))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "not allowed" in error.details() or "empty segment" in error.details()
    for asked in (role, "admin"):
        error = await refused(stub.GetPodCredentials(credentials_request(ip, asked), timeout=5))
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert moto_sts.assume_role_calls(BASE_ARN + "admin") == 0
    assert moto_sts.assume_role_calls(BASE_ARN + role) == 0


async def test_role_in_unlisted_account_is_refused_even_when_pattern_permits_everything(
    podiam, kube, stub, moto_sts
):
    role = f"arn:aws:iam::{UNLISTED_ACCOUNT}:role/anything"
    ip = add_pod(kube, "anything", "abroad", role)
    await indexed(podiam, ip)
    error = await refused(stub.GetPodCredentials(credentials_request(ip, role), timeout=5))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert UNLISTED_ACCOUNT in error.details() and "--allowed-account" in error.details()
    assert moto_sts.assume_role_calls(role) == 0
    await eventually(
        lambda: any(
            e["involvedObject"]["name"] == "abroad" and e["reason"] == "PodiamAccountNotAllowed"
            for e in kube.events
        )
    )


async def test_role_in_listed_account_is_served(podiam, kube, stub, moto_sts):
    role = f"arn:aws:iam::{LISTED_ACCOUNT}:role/partner"
    ip = add_pod(kube, "anything", "partnered", role)
    await indexed(podiam, ip)
    creds = await stub.GetPodCredentials(credentials_request(ip, role), timeout=5)
    assert creds.access_key_id
    assert moto_sts.assume_role_calls(role) >= 1


# ---- ambiguous IPs, through the agent ------------------------------------------------------


@pytest.mark.parametrize("roles", [("app-twin-a", "app-twin-b"), (None, None)])
async def test_ambiguous_ip_is_refused_403_with_reason(podiam, kube, agent, roles):
    ip = next_pod_ip(kube)
    suffix = "roles" if roles[0] else "plain"
    add_pod(kube, "apps", f"twin-a-{suffix}", roles[0], ip=ip)
    add_pod(kube, "apps", f"twin-b-{suffix}", roles[1], ip=ip)
    await eventually(lambda: len(podiam.server.registry.pods_with_ip(ip)) == 2)
    await eventually(lambda: getattr(agent.state.pods.get(ip), "reason", "") == "ambiguous-ip")

    before = metric("podiam_agent_refusals_total", reason="ambiguous-ip")
    for path in (CREDS, CREDS + "app-twin-a", "/latest/meta-data/iam/info"):
        status, body = await agent_get(agent, ip, path)
        assert status == 403, (path, status, body)
        assert "several active pods" in body and "AccessKeyId" not in body
    assert metric("podiam_agent_refusals_total", reason="ambiguous-ip") == before + 3


async def test_ambiguous_ip_is_refused_403_with_reason_without_the_stream_too(
    podiam, kube, tls_dirs
):
    # A lookup whose stream is not live answers from the unary RPCs, kiam's wire: the reason
    # travels in trailing metadata.
    ip = next_pod_ip(kube)
    add_pod(kube, "apps", "unary-twin-a", None, ip=ip)
    add_pod(kube, "apps", "unary-twin-b", None, ip=ip)
    await eventually(lambda: len(podiam.server.registry.pods_with_ip(ip)) == 2)
    connection = ServerConnection(f"127.0.0.1:{podiam.server.port}", tls_dirs.agent)
    connected = asyncio.Event()
    connected.set()
    lookup = PodLookup(NodeState(), ServerClient(connection), pod_wait=0.9, synced_once=connected)
    try:
        for ask in (lookup.entry(ip), lookup.credentials(ip, "app-x")):
            with pytest.raises(Refused) as refusal:
                await ask
            assert (refusal.value.status, refusal.value.reason) == (403, "ambiguous-ip")
            assert "several pods" in refusal.value.message
    finally:
        await connection.close()


# ---- credentials leave every cache with their identity -----------------------------------------


async def test_released_identity_leaves_no_credentials_in_any_cache(podiam, kube, agent):
    ip = add_pod(kube, "apps", "short-lived", "app-short-lived")
    status, body = await agent_get(agent, ip, CREDS + "app-short-lived")
    assert status == 200
    server = podiam.server
    identity = server.registry.lookup(ip).grant.identity
    creds = server.cache.peek(identity)
    assert creds is not None and creds.access_key_id in body
    assert identity in server.messages  # built once, kept while the cache holds the credentials
    assert server.messages.message(identity, creds) is server.messages.message(identity, creds)

    kube.delete_pod("apps", "short-lived")
    await eventually(lambda: server.cache.peek(identity) is None)
    assert identity not in server.messages
    await eventually(lambda: identity.key not in agent.state.credentials)
    served = agent.state.credentials.values()
    assert not any(creds.access_key_id.encode() in doc.body for doc in served)
