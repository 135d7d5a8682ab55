"""Workload identities: replicas of one workload share one STS session, so AssumeRole calls grow
with workloads, not pods; the session-name annotation still wins, and --session-name-from
chooses per pod or one fixed session instead."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from protos import kiam_pb2
from server.pods import pod_from_object, workload_of
from server.sessions import SessionNameFrom, session_namer
from tests.support.kubeapi import KubeApiServer
from tests.support.moto_sts import caller_arn
from tests.support.objects import replica_pod_object
from tests.support.server import BASE_ARN, as_aws
from tests.support.waiting import eventually

NODE = "127.0.0.1"
_ips = (f"10.{200 + n // 250}.{n % 250}.9" for n in itertools.count(1))


def owned(kind: str, name: str, *, labels: dict[str, str] | None = None, **extra: Any) -> dict:
    """Pod metadata as a controller writes it: a controller owner reference and its labels."""
    return {
        "name": extra.get("pod", f"{name}-x7k2p"),
        "namespace": "shop",
        "labels": labels or {},
        "ownerReferences": [
            {"apiVersion": "v1", "kind": "ConfigMap", "name": "not-a-controller"},
            {"apiVersion": "apps/v1", "kind": kind, "name": name, "controller": True},
        ],
    }


@pytest.mark.parametrize(
    ("meta", "workload"),
    [
        (owned("ReplicaSet", "web-6d4cf56db6", labels={"pod-template-hash": "6d4cf56db6"}),
         "Deployment/web"),
        # A ReplicaSet made by hand (no pod-template-hash suffix) is its own workload.
        (owned("ReplicaSet", "legacy-rs"), "ReplicaSet/legacy-rs"),
        (owned("StatefulSet", "db", labels={"controller-revision-hash": "db-5b9c"}),
         "StatefulSet/db"),
        (owned("DaemonSet", "agent", labels={"controller-revision-hash": "7f8"}),
         "DaemonSet/agent"),
        (owned("Job", "migrate"), "Job/migrate"),
        (owned("Job", "nightly-report-29012400"), "CronJob/nightly-report"),
        (owned("Rollout", "canary"), "Rollout/canary"),
        ({"name": "debug-shell", "namespace": "shop"}, "Pod/debug-shell"),
        # An owner that is not the controller does not make a workload.
        ({"name": "lonely", "ownerReferences": [{"kind": "ReplicaSet", "name": "rs"}]},
         "Pod/lonely"),
    ],
)  # fmt: skip
def test_a_pods_workload_is_read_from_its_controller_and_the_naming_conventions(meta, workload):
    assert workload_of(meta) == workload


def record(meta: dict, **annotations: str):
    return pod_from_object(
        {
            "metadata": {**meta, "uid": "u-1", "annotations": annotations},
            "spec": {"serviceAccountName": "checkout"},
            "status": {"podIP": "10.0.0.5", "hostIP": NODE, "phase": "Running"},
        }
    )


DEPLOYMENT_POD = owned(
    "ReplicaSet",
    "web-6d4cf56db6",
    labels={"pod-template-hash": "6d4cf56db6"},
    pod="web-6d4cf56db6-abcde",
)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (SessionNameFrom.WORKLOAD, "podiam-web"),
        (SessionNameFrom.POD, "podiam-web-6d4cf56db6-abcde"),
        (SessionNameFrom.FIXED, "podiam"),
    ],
)
def test_session_name_follows_session_name_from(source, expected):
    assert session_namer(source, "podiam")(record(DEPLOYMENT_POD)) == expected


@pytest.mark.parametrize("source", list(SessionNameFrom))
def test_session_name_annotation_wins_in_every_mode(source):
    pod = record(DEPLOYMENT_POD, **{"iam.amazonaws.com/session-name": "billing"})
    assert session_namer(source, "podiam")(pod) == "podiam-billing"


def test_workload_session_names_are_sanitised_and_at_most_64_characters():
    meta = owned("StatefulSet", "very-long-" * 10)
    name = session_namer(SessionNameFrom.WORKLOAD, "team:prod")(record(meta))
    assert len(name) == 64
    assert name.startswith("team-prod-very-long-")


def test_replicas_share_one_interned_workload_string():
    first = record(DEPLOYMENT_POD)
    second = record({**DEPLOYMENT_POD, "name": "web-6d4cf56db6-zzzzz"})
    assert first.workload is second.workload
    assert first.service_account == "checkout"


# ---- end to end: a real server, moto as STS -------------------------------------------------


@pytest.fixture(scope="module")
def namespaces() -> dict[str, str | None]:
    return {"shop": "shop-.*"}


def add_replica(kube: KubeApiServer, deployment: str, n: int, role: str) -> str:
    ip = next(_ips)
    pod = replica_pod_object(
        "shop", deployment, n, template_hash="5f7c9d8b4", ip=ip, host_ip=NODE, role=role
    )
    kube.store.create("pods", pod)
    return ip


async def test_replicas_of_one_deployment_share_one_session_and_one_assume_role(
    podiam, kube, stub, moto_sts
):
    role = "shop-cart"
    ips = [add_replica(kube, "cart", n, role) for n in range(12)]
    await eventually(lambda: all(podiam.server.registry.lookup(ip).pod for ip in ips))
    answers = await asyncio.gather(
        *(stub.GetPodCredentials(kiam_pb2.GetPodCredentialsRequest(ip=ip, role=role)) for ip in ips)
    )
    assert len({answer.access_key_id for answer in answers}) == 1
    calls = moto_sts.calls(BASE_ARN + role)
    assert [call.session_name for call in calls] == ["podiam-cart"]
    who = await asyncio.to_thread(caller_arn, moto_sts.endpoint_url, as_aws(answers[0]))
    assert who.endswith(":assumed-role/shop-cart/podiam-cart")


async def test_two_deployments_with_one_role_are_two_sessions(podiam, kube, stub, moto_sts):
    role = "shop-pay"
    ips = [add_replica(kube, name, n, role) for name in ("pay-api", "pay-worker") for n in range(3)]
    await eventually(lambda: all(podiam.server.registry.lookup(ip).pod for ip in ips))
    await eventually(lambda: moto_sts.assume_role_calls(BASE_ARN + role) == 2)
    sessions = sorted(call.session_name for call in moto_sts.calls(BASE_ARN + role))
    assert sessions == ["podiam-pay-api", "podiam-pay-worker"]
