"""Session tags (ABAC), as EKS Pod Identity offers them: what STS is asked for, seen in the
AssumeRole requests themselves (moto behind the recording front)."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from protos import kiam_pb2
from server.identity import RoleIdentity
from server.pods import pod_from_object
from server.sessions import sanitised_tag_value, session_tagger
from server.sts import StsGateway
from tests.support.kubeapi import KubeApiServer
from tests.support.moto_sts import fake_session
from tests.support.objects import replica_pod_object
from tests.support.server import BASE_ARN
from tests.support.waiting import eventually

NODE = "127.0.0.1"
_ips = (f"10.{220 + n // 250}.{n % 250}.13" for n in itertools.count(1))


def pod(name: str = "api-6b7c8d9f5-q2w3e", **meta):
    return pod_from_object(
        {
            "metadata": {
                "namespace": "billing",
                "name": name,
                "uid": "0b5e2c1a-uid",
                "labels": {"pod-template-hash": "6b7c8d9f5"},
                "ownerReferences": [
                    {"kind": "ReplicaSet", "name": "api-6b7c8d9f5", "controller": True}
                ],
                **meta,
            },
            "spec": {"serviceAccountName": "invoicer"},
            "status": {"podIP": "10.0.0.1", "hostIP": NODE, "phase": "Running"},
        }
    )


def test_workload_sessions_are_tagged_with_namespace_service_account_and_workload():
    tags = session_tagger(per_pod=False, cluster_name="prod-eu")(pod())
    assert tags == (
        ("kubernetes-cluster", "prod-eu"),
        ("kubernetes-namespace", "billing"),
        ("kubernetes-service-account", "invoicer"),
        ("kubernetes-workload", "Deployment/api"),
    )


def test_pod_name_and_uid_are_tagged_only_when_sessions_are_per_pod():
    tags = dict(session_tagger(per_pod=True)(pod()))
    assert tags["kubernetes-pod-name"] == "api-6b7c8d9f5-q2w3e"
    assert tags["kubernetes-pod-uid"] == "0b5e2c1a-uid"
    assert "kubernetes-cluster" not in tags
    # Replicas of a workload keep one identity when the tags do not name the pod.
    workload = session_tagger(per_pod=False)
    assert workload(pod()) == workload(pod("api-6b7c8d9f5-zzzzz"))


@pytest.mark.parametrize(
    ("raw", "accepted"),
    [
        ("Deployment/api", "Deployment/api"),
        ("team a:b=c+d-e@f.g_h", "team a:b=c+d-e@f.g_h"),
        ("naïve-名前", "naïve-名前"),  # Unicode letters are allowed
        ("a*b?c#d", "a_b_c_d"),
        ("x" * 300, "x" * 256),
    ],
)
def test_tag_values_are_sanitised_the_way_sts_accepts_them(raw, accepted):
    assert sanitised_tag_value(raw) == accepted


def test_tags_are_part_of_the_identity_key():
    plain = RoleIdentity(BASE_ARN + "r", "s")
    tagged = RoleIdentity(BASE_ARN + "r", "s", tags=(("kubernetes-namespace", "a"),))
    other = RoleIdentity(BASE_ARN + "r", "s", tags=(("kubernetes-namespace", "b"),))
    assert len({plain.key, tagged.key, other.key}) == 3
    assert plain != tagged != other


@pytest.mark.parametrize("transitive", [False, True])
async def test_assume_role_sends_the_identitys_tags_and_transitive_keys(sts, transitive):
    gateway = StsGateway(
        region="us-east-1",
        endpoint_url=sts.endpoint_url,
        boto_session=fake_session(),
        transitive_tags=transitive,
    )
    tags = session_tagger(per_pod=True, cluster_name="prod")(pod())
    try:
        creds = await gateway.assume_role(
            RoleIdentity(BASE_ARN + "tagged", "podiam-api", tags=tags)
        )
    finally:
        gateway.close()
    assert creds.access_key_id
    (call,) = sts.calls(BASE_ARN + "tagged")
    assert call.tags == tags
    assert call.transitive_tag_keys == (tuple(key for key, _ in tags) if transitive else ())


async def test_untagged_identities_send_no_tags(sts):
    gateway = StsGateway(
        region="us-east-1", endpoint_url=sts.endpoint_url, boto_session=fake_session()
    )
    try:
        await gateway.assume_role(RoleIdentity(BASE_ARN + "plain", "podiam-plain"))
    finally:
        gateway.close()
    (call,) = sts.calls(BASE_ARN + "plain")
    assert (call.tags, call.transitive_tag_keys) == ((), ())


# ---- end to end: --session-tags on a real server --------------------------------------------


@pytest.fixture(scope="module")
def namespaces() -> dict[str, str | None]:
    return {"billing": "fin-.*", "refunds": "fin-.*"}


@pytest.fixture(scope="module")
def server_flags() -> list[str]:
    return ["--session-tags", "--transitive-session-tags", "--cluster-name", "prod-eu"]


def add_replica(kube: KubeApiServer, namespace: str, n: int, role: str) -> str:
    ip = next(_ips)
    obj = replica_pod_object(
        namespace, "api", n, template_hash="6b7c8d9f5", ip=ip, host_ip=NODE, role=role
    )
    obj["spec"]["serviceAccountName"] = "invoicer"
    kube.store.create("pods", obj)
    return ip


async def test_tagged_replicas_share_one_session_whose_request_carries_the_tags(
    podiam, kube, stub, moto_sts
):
    role = "fin-ledger"
    ips = [add_replica(kube, "billing", n, role) for n in range(5)]
    await eventually(lambda: all(podiam.server.registry.lookup(ip).pod for ip in ips))
    answers = await asyncio.gather(
        *(stub.GetPodCredentials(kiam_pb2.GetPodCredentialsRequest(ip=ip, role=role)) for ip in ips)
    )
    assert len({a.access_key_id for a in answers}) == 1
    (call,) = moto_sts.calls(BASE_ARN + role)
    assert call.session_name == "podiam-api"
    assert dict(call.tags) == {
        "kubernetes-cluster": "prod-eu",
        "kubernetes-namespace": "billing",
        "kubernetes-service-account": "invoicer",
        "kubernetes-workload": "Deployment/api",
    }
    assert set(call.transitive_tag_keys) == set(dict(call.tags))


async def test_same_workload_name_in_another_namespace_is_another_tagged_session(
    podiam, kube, stub, moto_sts
):
    role = "fin-refund"
    ips = [add_replica(kube, ns, 90, role) for ns in ("billing", "refunds")]
    await eventually(lambda: all(podiam.server.registry.lookup(ip).pod for ip in ips))
    await eventually(lambda: moto_sts.assume_role_calls(BASE_ARN + role) == 2)
    namespaces = sorted(
        dict(c.tags)["kubernetes-namespace"] for c in moto_sts.calls(BASE_ARN + role)
    )
    assert namespaces == ["billing", "refunds"]
