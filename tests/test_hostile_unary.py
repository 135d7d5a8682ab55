"""GetPodCredentials answered hot, against a real server (real Kubernetes list/watch API test
server, moto as STS, mutual-TLS gRPC): however many times a pod's answer was just served, the
next call after any change to what the pod may have follows the change. No answer for a pod
outlives its namespace's permission, its role annotation, the pod itself, its IP's owner, or
the credentials it carried; and two pods asking at once each get their own identity's.

The server keeps each identity's current credentials serialized (server/credentials_proto.py);
these tests hold whatever it keeps to the same rules as the answer built afresh.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from protos import kiam_pb2
from server.identity import RoleIdentity
from tests.support.moto_sts import caller_arn
from tests.support.objects import PERMITTED, ROLE
from tests.support.pods import add_pod
from tests.support.server import BASE_ARN, as_aws, indexed, refused
from tests.support.waiting import eventually

HOT = 20  # calls in a row before the change: the answer is as warm as the server makes it


@pytest.fixture(scope="module")
def namespaces():
    return {"apps": "app-.*"}


def ask(ip: str, role: str) -> kiam_pb2.GetPodCredentialsRequest:
    return kiam_pb2.GetPodCredentialsRequest(ip=ip, role=role)


async def served_hot(stub, ip: str, role: str) -> kiam_pb2.Credentials:
    """The answer to ``HOT`` calls in a row, each the same."""
    answers = [await stub.GetPodCredentials(ask(ip, role)) for _ in range(HOT)]
    assert len({answer.SerializeToString() for answer in answers}) == 1
    return answers[-1]


async def refused_from_now(stub, ip: str, role: str) -> grpc.aio.AioRpcError:
    """Waits until a call for ``ip`` is refused, then checks that the calls after it are too
    (nothing warm is left to serve); the error."""

    async def refused_now() -> bool:
        try:
            await stub.GetPodCredentials(ask(ip, role))
        except grpc.aio.AioRpcError:
            return True
        return False

    await eventually(refused_now)
    errors = [await refused(stub.GetPodCredentials(ask(ip, role))) for _ in range(HOT)]
    assert len({(error.code(), error.details()) for error in errors}) == 1
    return errors[-1]


def identity_of(podiam, ip: str) -> RoleIdentity:
    grant = podiam.server.registry.lookup(ip).grant
    assert grant is not None and grant.identity is not None
    return grant.identity


async def test_hot_answer_is_refused_once_the_namespace_stops_permitting_the_role(
    podiam, kube, stub
):
    kube.add_namespace("fickle-unary", annotations={PERMITTED: "fickle-.*"})
    ip = add_pod(kube, "fickle-unary", "pod", "fickle-role")
    await indexed(podiam, ip)
    await eventually(lambda: podiam.server.registry.lookup(ip).grant.identity is not None)
    await served_hot(stub, ip, "fickle-role")

    kube.update_namespace("fickle-unary", annotations={PERMITTED: "nothing"})
    error = await refused_from_now(stub, ip, "fickle-role")
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "not permitted by namespace 'fickle-unary'" in error.details()

    # Permitted again: a fresh answer, not a denial remembered.
    kube.update_namespace("fickle-unary", annotations={PERMITTED: "fickle-.*"})
    await eventually(lambda: podiam.server.registry.lookup(ip).grant.identity is not None)
    assert (await served_hot(stub, ip, "fickle-role")).access_key_id


async def test_hot_answer_follows_a_role_annotation_change(podiam, kube, stub, moto_sts):
    ip = add_pod(kube, "apps", "changing-role", "app-before")
    await indexed(podiam, ip)
    before = await served_hot(stub, ip, "app-before")

    kube.update_pod("apps", "changing-role", annotations={ROLE: "app-after"})
    error = await refused_from_now(stub, ip, "app-before")
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "is not the pod's role 'app-after'" in error.details()

    after = await served_hot(stub, ip, "app-after")
    assert after.access_key_id != before.access_key_id
    who = await asyncio.to_thread(caller_arn, moto_sts.endpoint_url, as_aws(after))
    assert ":assumed-role/app-after/" in who


async def test_hot_answer_is_not_found_once_the_pod_is_deleted(podiam, kube, stub):
    ip = add_pod(kube, "apps", "deleted", "app-deleted")
    await indexed(podiam, ip)
    await served_hot(stub, ip, "app-deleted")

    kube.delete_pod("apps", "deleted")
    error = await refused_from_now(stub, ip, "app-deleted")
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert f"no active pod has IP {ip}" in error.details()


async def test_hot_answer_for_a_reused_ip_is_the_new_pods_identity_never_the_old(
    podiam, kube, stub
):
    ip = add_pod(kube, "apps", "first-holder", "app-first-holder")
    await indexed(podiam, ip)
    old = await served_hot(stub, ip, "app-first-holder")

    # The same IP, the same namespace and node, another pod with another role.
    kube.delete_pod("apps", "first-holder")
    add_pod(kube, "apps", "next-holder", "app-next-holder", ip=ip)
    await eventually(
        lambda: (p := podiam.server.registry.lookup(ip).pod) is not None and p.name == "next-holder"
    )
    error = await refused(stub.GetPodCredentials(ask(ip, "app-first-holder")))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    new = await served_hot(stub, ip, "app-next-holder")
    assert new.access_key_id != old.access_key_id
    held = podiam.server.cache.peek(identity_of(podiam, ip))
    assert held is not None and new.access_key_id == held.access_key_id


async def test_pods_asking_at_once_each_get_their_own_identitys_credentials(podiam, kube, stub):
    roles = [f"app-crowd-{n}" for n in range(8)]
    ips = [add_pod(kube, "apps", f"crowd-{n}", role) for n, role in enumerate(roles)]
    for ip in ips:
        await indexed(podiam, ip)
    expected = {}
    for ip in ips:
        await eventually(lambda ip=ip: podiam.server.cache.peek(identity_of(podiam, ip)))
        expected[ip] = podiam.server.cache.peek(identity_of(podiam, ip)).access_key_id
    assert len(set(expected.values())) == len(ips)

    calls = [(ip, role) for _ in range(HOT) for ip, role in zip(ips, roles, strict=True)]
    answers = await asyncio.gather(*(stub.GetPodCredentials(ask(ip, role)) for ip, role in calls))

    got = {(ip, answer.access_key_id) for (ip, _), answer in zip(calls, answers, strict=True)}
    assert got == set(expected.items())


async def test_released_identity_is_never_answered_with_its_old_credentials(podiam, kube, stub):
    ip = add_pod(kube, "apps", "released", "app-released")
    await indexed(podiam, ip)
    old = await served_hot(stub, ip, "app-released")
    identity = identity_of(podiam, ip)
    server = podiam.server

    kube.delete_pod("apps", "released")  # the last pod with the identity: released
    await eventually(lambda: server.cache.peek(identity) is None)
    assert identity not in server.messages

    # The same identity again (same role and session name): new credentials, never the old.
    ip = add_pod(kube, "apps", "released", "app-released", ip=ip)
    await indexed(podiam, ip)
    new = await served_hot(stub, ip, "app-released")
    assert new.access_key_id != old.access_key_id
    assert new.access_key_id == server.cache.peek(identity).access_key_id


async def test_full_arn_and_short_name_get_the_same_bytes(podiam, kube, stub):
    ip = add_pod(kube, "apps", "spelled-twice", "app-spelled")
    await indexed(podiam, ip)
    short = await served_hot(stub, ip, "app-spelled")
    full = await served_hot(stub, ip, BASE_ARN + "app-spelled")
    assert short.SerializeToString() == full.SerializeToString()
