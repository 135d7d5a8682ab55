"""The agent's NodeState on its own: node stream messages in, what the hot path reads out, and
requests waiting for a pod that the stream has not mentioned yet."""

from __future__ import annotations

import asyncio
import json

import pytest

from agent.state import NodeState
from protos import kiam_pb2

ROLE_ARN = "arn:aws:iam::123456789012:role/team/app-reader"


def state(ip: str, *, identity: str = "", denied: str = "", reason: str = "") -> kiam_pb2.PodState:
    return kiam_pb2.PodState(
        ip=ip, role="team/app-reader", role_arn=ROLE_ARN, identity=identity, denied=denied,
        reason=reason,
    )  # fmt: skip


def creds(identity: str, key: str) -> kiam_pb2.IdentityCredentials:
    return kiam_pb2.IdentityCredentials(
        identity=identity,
        credentials=kiam_pb2.Credentials(
            code="Success",
            type="AWS-HMAC",
            access_key_id=key,
            secret_access_key=f"secret-{key}",
            token=f"token-{key}",
            expiration="2030-01-01T00:00:00Z",
            last_updated="2029-12-31T23:00:00Z",
        ),
    )


async def _turns(n: int) -> None:
    """Let the event loop run ``n`` rounds of ready callbacks (no time passes)."""
    for _ in range(n):
        await asyncio.sleep(0)


def snapshot(*pods: kiam_pb2.PodState, credentials=()) -> kiam_pb2.NodeUpdate:
    return kiam_pb2.NodeUpdate(reset=True, synced=True, pods=pods, credentials=credentials)


def test_snapshot_gives_each_pod_its_role_name_and_credentials_document() -> None:
    node = NodeState()
    node.apply(snapshot(state("10.0.0.1", identity="id-1"), credentials=[creds("id-1", "AK1")]))

    entry = node.pods["10.0.0.1"]
    assert (entry.role, entry.role_name) == ("team/app-reader", "app-reader")
    assert entry.identity == "id-1"
    document = json.loads(node.credentials["id-1"].body)
    assert list(document) == [
        "Code", "LastUpdated", "Type", "AccessKeyId", "SecretAccessKey", "Token", "Expiration"
    ]  # fmt: skip
    assert document["AccessKeyId"] == "AK1" and document["Expiration"] == "2030-01-01T00:00:00Z"
    assert node.credentials["id-1"].last_updated == "2029-12-31T23:00:00Z"
    assert node.live


def test_a_new_snapshot_replaces_everything_the_last_one_said() -> None:
    node = NodeState()
    node.apply(snapshot(state("10.0.0.1", identity="id-1"), credentials=[creds("id-1", "AK1")]))
    node.apply(snapshot(state("10.0.0.2")))
    assert set(node.pods) == {"10.0.0.2"}
    assert node.credentials == {}


def test_changes_remove_before_they_add() -> None:
    node = NodeState()
    node.apply(snapshot(state("10.0.0.1", identity="old"), credentials=[creds("old", "AK-OLD")]))
    # One message: the IP now names another pod, with other credentials; the old ones go.
    node.apply(
        kiam_pb2.NodeUpdate(
            removed_ips=["10.0.0.1"],
            removed_identities=["old"],
            pods=[state("10.0.0.1", identity="new")],
            credentials=[creds("new", "AK-NEW")],
        )
    )
    assert node.pods["10.0.0.1"].identity == "new"
    assert set(node.credentials) == {"new"}


def test_refreshed_credentials_replace_the_document() -> None:
    node = NodeState()
    node.apply(snapshot(state("10.0.0.1", identity="id-1"), credentials=[creds("id-1", "AK1")]))
    node.apply(kiam_pb2.NodeUpdate(credentials=[creds("id-1", "AK2")]))
    assert json.loads(node.credentials["id-1"].body)["AccessKeyId"] == "AK2"


def test_lost_stream_keeps_serving_only_within_the_stale_grace_without_route_evidence() -> None:
    now = [100.0]
    node = NodeState(stale_grace=25.0, monotonic=lambda: now[0])
    node.apply(snapshot(state("10.0.0.1", identity="id-1"), credentials=[creds("id-1", "AK1")]))
    node.lost()
    assert not node.live
    # No host route was ever seen for the IP: only the grace keeps it trusted.
    assert node.usable_entry("10.0.0.1") is not None
    assert node.usable_credentials("id-1") is not None
    now[0] += 25.0
    assert node.usable_entry("10.0.0.1") is None


def test_lost_stream_never_serves_credentials_that_are_about_to_expire() -> None:
    node = NodeState(stale_grace=25.0, wall=lambda: 1_893_455_990.0)  # 10 s before 2030
    node.apply(snapshot(state("10.0.0.1", identity="id-1"), credentials=[creds("id-1", "AK1")]))
    assert node.usable_credentials("id-1") is not None  # a live stream withdraws them itself
    node.lost()
    assert node.usable_credentials("id-1") is None


@pytest.mark.parametrize(
    ("pod", "with_credentials", "ready"),
    [
        (None, False, False),  # the stream has not mentioned the IP
        (state("10.0.0.1", identity="id-1"), False, False),  # permitted, credentials not here
        (state("10.0.0.1", identity="id-1"), True, True),
        (state("10.0.0.1", denied="not permitted", reason="not-permitted"), False, True),
        (kiam_pb2.PodState(ip="10.0.0.1"), False, True),  # no role: answered at once
    ],
)
def test_ready_means_the_stream_can_answer_for_the_ip(pod, with_credentials, ready) -> None:
    node = NodeState()
    node.apply(
        snapshot(
            *([pod] if pod is not None else []),
            credentials=[creds("id-1", "AK1")] if with_credentials else [],
        )
    )
    assert node.ready("10.0.0.1") is ready


async def test_waiting_request_wakes_when_its_pod_and_credentials_arrive() -> None:
    node = NodeState()
    node.apply(snapshot())
    waiter = asyncio.create_task(node.wait_ready("10.0.0.1", seconds=30))
    await asyncio.sleep(0)  # let it start waiting
    node.apply(kiam_pb2.NodeUpdate(pods=[state("10.0.0.1", identity="id-1")]))
    await asyncio.sleep(0)
    assert not waiter.done()  # the pod is known, its credentials are not
    node.apply(kiam_pb2.NodeUpdate(credentials=[creds("id-1", "AK1")]))
    await _turns(3)  # woken by the update itself: no timer, no polling interval
    assert waiter.done() and waiter.result() is True


async def test_a_burst_of_waiting_requests_is_answered_batch_by_batch_as_pods_arrive() -> None:
    node = NodeState()
    node.apply(snapshot(credentials=[creds("id-1", "AK1")]))
    ips = [f"10.0.1.{n}" for n in range(1, 201)]
    waiters = {ip: asyncio.create_task(node.wait_ready(ip, seconds=30)) for ip in ips}
    await asyncio.sleep(0)
    assert node.waiting == len(ips)
    for batch in range(0, len(ips), 50):
        arrived = ips[batch : batch + 50]
        node.apply(kiam_pb2.NodeUpdate(pods=[state(ip, identity="id-1") for ip in arrived]))
        await _turns(3)
        assert all(waiters[ip].done() and waiters[ip].result() for ip in arrived)
        assert not any(waiters[ip].done() for ip in ips[batch + 50 :])
        assert node.waiting == len(ips) - batch - 50


async def test_waiting_request_gives_up_at_once_when_the_stream_breaks() -> None:
    node = NodeState()
    node.apply(snapshot())
    waiter = asyncio.create_task(node.wait_ready("10.0.0.9", seconds=30))
    await asyncio.sleep(0)
    node.lost()
    await _turns(3)
    assert waiter.done() and waiter.result() is False


async def test_waiting_for_a_pod_that_never_comes_ends_after_its_time() -> None:
    node = NodeState()
    node.apply(snapshot())
    assert await node.wait_ready("10.0.0.9", seconds=0.01) is False


async def test_ready_pod_is_answered_without_waiting() -> None:
    node = NodeState()
    node.apply(snapshot(state("10.0.0.1", identity="id-1"), credentials=[creds("id-1", "AK1")]))
    assert await node.wait_ready("10.0.0.1", seconds=0) is True
