"""The audit trail: a CloudTrail event's accessKeyId leads to the pods that held it, one record
per credential set and one per pod, never a secret."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from pathlib import Path

import pytest

from protos import kiam_pb2
from server.audit import AuditTrail
from server.identity import RoleIdentity
from server.pods import pod_from_object
from tests.support.kubeapi import KubeApiServer
from tests.support.objects import replica_pod_object
from tests.support.server import BASE_ARN
from tests.support.waiting import eventually

NODE = "127.0.0.1"  # the test client connects from here: "the agent's node"
_ips = (f"10.{210 + n // 250}.{n % 250}.11" for n in itertools.count(1))


@pytest.fixture(scope="module")
def namespaces() -> dict[str, str | None]:
    return {"ledger": "ledger-.*"}


@pytest.fixture(scope="module")
def audit_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("audit") / "audit.jsonl"


@pytest.fixture(scope="module")
def server_flags(audit_file: Path) -> list[str]:
    return ["--audit-log", str(audit_file)]


def records(path: Path, kind: str, **match: str) -> list[dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [
        r for r in lines if r.get("audit") == kind and all(r.get(k) == v for k, v in match.items())
    ]


def add_replicas(kube: KubeApiServer, deployment: str, role: str, count: int) -> list[str]:
    ips = []
    for n in range(count):
        ip = next(_ips)
        pod = replica_pod_object(
            "ledger", deployment, n, template_hash="7c9d5b8f6", ip=ip, host_ip=NODE, role=role
        )
        kube.store.create("pods", pod)
        ips.append(ip)
    return ips


async def test_access_key_leads_to_the_one_credential_set_and_every_pod_that_held_it(
    podiam, kube, stub, audit_file
):
    role = "ledger-writer"
    ips = add_replicas(kube, "writer", role, 3)
    await eventually(lambda: all(podiam.server.registry.lookup(ip).pod for ip in ips))
    answers = [
        await stub.GetPodCredentials(kiam_pb2.GetPodCredentialsRequest(ip=ip, role=role))
        for ip in ips * 2  # asking again adds no records
    ]
    key_id = answers[0].access_key_id

    (credentials,) = records(audit_file, "credentials", access_key_id=key_id)
    assert credentials["role_arn"] == BASE_ARN + role
    assert credentials["session_name"] == "podiam-writer"
    assert credentials["expiration"] == answers[0].expiration
    pods = records(audit_file, "pod", identity=credentials["identity"])
    assert sorted(p["pod"] for p in pods) == [f"writer-7c9d5b8f6-{n:05d}" for n in range(3)]
    assert {(p["namespace"], p["node"], p["access_key_id"]) for p in pods} == {
        ("ledger", NODE, key_id)
    }
    uids = {podiam.server.registry.lookup(ip).pod.uid for ip in ips}
    assert {p["uid"] for p in pods} == uids


async def test_the_audit_trail_never_holds_a_secret_or_a_token(podiam, kube, stub, audit_file):
    role = "ledger-reader"
    (ip,) = add_replicas(kube, "reader", role, 1)
    await eventually(lambda: podiam.server.registry.lookup(ip).pod is not None)
    creds = await stub.GetPodCredentials(kiam_pb2.GetPodCredentialsRequest(ip=ip, role=role))
    text = audit_file.read_text()
    assert creds.access_key_id in text
    assert creds.secret_access_key not in text and creds.token not in text


async def test_pods_served_through_the_node_stream_are_recorded(podiam, kube, stub, audit_file):
    role = "ledger-streamed"
    ips = add_replicas(kube, "streamed", role, 2)
    stream = stub.WatchNode(kiam_pb2.WatchNodeRequest())
    held: dict[str, str] = {}

    async def follow():
        async for update in stream:
            for item in update.credentials:
                held[item.identity] = item.credentials.access_key_id

    task = asyncio.create_task(follow())
    try:
        await eventually(lambda: len(records(audit_file, "pod", role_arn=BASE_ARN + role)) == 2)
    finally:
        stream.cancel()
        await asyncio.gather(task, return_exceptions=True)
    pods = records(audit_file, "pod", role_arn=BASE_ARN + role)
    assert {p["access_key_id"] for p in pods} <= set(held.values())
    assert len(pods) == len(ips)


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_audit_records_reach_the_process_log_whatever_its_level():
    root = logging.getLogger()
    level, collect = root.level, Collect()
    root.setLevel(logging.WARNING)  # as with --log-level warning
    root.addHandler(collect)
    trail = AuditTrail("-")
    pod = pod_from_object(
        {
            "metadata": {"namespace": "ns", "name": "p", "uid": "uid-1"},
            "status": {"podIP": "10.0.0.1", "hostIP": "10.1.0.1", "phase": "Running"},
        }
    )
    identity = RoleIdentity(BASE_ARN + "r", "podiam-p")
    try:
        trail.pod_served(pod, identity, "ASIAEXAMPLE")
        trail.pod_served(pod, identity, "ASIAEXAMPLE")
    finally:
        root.removeHandler(collect)
        root.setLevel(level)
    served = [r for r in collect.records if getattr(r, "audit", None) == "pod"]
    assert len(served) == 1
    assert (served[0].uid, served[0].access_key_id, served[0].node) == (
        "uid-1",
        "ASIAEXAMPLE",
        "10.1.0.1",
    )
