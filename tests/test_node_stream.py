"""One node stream on its own: a real Registry fed raw objects through its sinks, a real
NodeFanout, and the messages the stream yields, read straight from its async generator.

Credentials are announced to the fan-out as the credentials cache announces them (most tests
make the announcements themselves; the last one joins a real cache and moto's STS), so what the
stream sends can be checked against exactly what was announced.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import pytest_asyncio
from prometheus_client import REGISTRY

from protos import kiam_pb2
from server.arn import RoleResolver
from server.credentials import CredentialCache
from server.credentials_proto import CredentialMessages
from server.fanout import NodeFanout
from server.identity import AwsCredentials, RoleIdentity
from server.node_stream import NodeStream
from server.registry import Registry
from server.sts import StsGateway
from tests.support.moto_sts import MotoSts, fake_session
from tests.support.objects import namespace_object, pod_object
from tests.support.waiting import eventually

BASE = "arn:aws:iam::123456789012:role/"
NODE = "10.0.0.1"
OTHER_NODE = "10.0.0.2"


class Holder:
    """Reference counts only; these tests announce credentials to the fan-out themselves."""

    def acquire(self, identity: RoleIdentity) -> None:
        pass

    def release(self, identity: RoleIdentity) -> None:
        pass


def credentials(name: str, *, lifetime: timedelta = timedelta(hours=1)) -> AwsCredentials:
    now = datetime.now(UTC).replace(microsecond=0)
    return AwsCredentials(
        access_key_id=f"ASIA{name.upper()}",
        secret_access_key=f"secret-{name}",
        token=f"token-{name}",
        expiration=now + lifetime,
        last_updated=now - timedelta(hours=1),
    )


def identity(role: str, pod: str) -> RoleIdentity:
    return RoleIdentity(BASE + role, f"podiam-{pod}")


class Lull:
    """The stream's clock, moved by the test, and its sleep, which lasts until the test ends it:
    a linger observed without waiting for real time."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.asked: list[float] = []  # each sleep the stream began, in seconds
        self._over = asyncio.Event()

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.asked.append(seconds)
        self._over.clear()
        await self._over.wait()
        self.now += seconds

    async def sleeping(self) -> None:
        """Until the stream has begun a sleep."""
        await eventually(lambda: bool(self.asked))

    def end(self) -> None:
        self._over.set()


class Node:
    """A registry and fan-out, and one agent's stream on NODE."""

    def __init__(self, holder=None, *, lull: Lull | None = None, linger: float = 0.0) -> None:
        self.messages = CredentialMessages()
        self.fanout = NodeFanout(self.messages)
        self.registry = Registry(
            resolver=RoleResolver(BASE),
            session_name=lambda pod: f"podiam-{pod.name}",
            credentials=holder or Holder(),
            changes=self.fanout,
        )
        self.registry.namespace_sink.upsert(namespace_object("apps", "app-.*"))
        timing = {"clock": lull.clock, "sleep": lull.sleep} if lull is not None else {}
        self.stream = NodeStream(
            pods=self.registry, fanout=self.fanout, host_ip=NODE, linger=linger, **timing
        )
        self.updates = self.stream.updates()

    def pod(self, name: str, role: str | None, *, ip: str, host_ip: str = NODE) -> dict:
        obj = pod_object("apps", name, role=role, ip=ip, host_ip=host_ip)
        self.registry.pod_sink.upsert(obj)
        return obj

    def delete(self, obj: dict) -> None:
        self.registry.pod_sink.delete(obj)

    async def next(self) -> kiam_pb2.NodeUpdate:
        return await asyncio.wait_for(anext(self.updates), 5)


@pytest_asyncio.fixture
async def node() -> AsyncIterator[Node]:
    node = Node()
    yield node
    await node.updates.aclose()


def pods_of(update: kiam_pb2.NodeUpdate) -> dict[str, kiam_pb2.PodState]:
    return {state.ip: state for state in update.pods}


def creds_of(update: kiam_pb2.NodeUpdate) -> dict[str, str]:
    return {item.identity: item.credentials.access_key_id for item in update.credentials}


async def test_snapshot_holds_this_nodes_pods_and_the_credentials_already_announced(
    node: Node,
) -> None:
    node.pod("web", "app-web", ip="10.1.0.1")
    node.pod("plain", None, ip="10.1.0.2")
    node.pod("remote", "app-remote", ip="10.1.0.3", host_ip=OTHER_NODE)
    node.pod("early", "app-early", ip="")  # no IP yet: not the agent's business
    web = identity("app-web", "web")
    node.fanout.credentials_changed(web, credentials("web"))

    snapshot = await node.next()

    assert snapshot.reset and snapshot.synced
    pods = pods_of(snapshot)
    assert set(pods) == {"10.1.0.1", "10.1.0.2"}
    assert (pods["10.1.0.1"].identity, pods["10.1.0.1"].role_arn) == (web.key, web.role_arn)
    assert pods["10.1.0.2"].identity == "" and pods["10.1.0.2"].reason == "no-role"
    assert creds_of(snapshot) == {web.key: "ASIAWEB"}


async def test_pods_added_and_deleted_arrive_as_changes(node: Node) -> None:
    await node.next()
    obj = node.pod("new", "app-new", ip="10.1.1.1")
    added = await node.next()
    assert not added.reset and set(pods_of(added)) == {"10.1.1.1"}

    node.delete(obj)
    removed = await node.next()
    assert list(removed.removed_ips) == ["10.1.1.1"] and not removed.pods


async def test_a_burst_of_changes_is_one_message(node: Node) -> None:
    await node.next()
    for n in range(5):
        node.pod(f"burst-{n}", "app-burst", ip=f"10.1.2.{n}")
    update = await node.next()
    assert set(pods_of(update)) == {f"10.1.2.{n}" for n in range(5)}


async def test_with_a_linger_a_change_after_a_quiet_spell_goes_out_at_once() -> None:
    lull = Lull()
    node = Node(lull=lull, linger=0.05)
    try:
        await node.next()
        lull.now += 0.06  # longer than the linger since the snapshot
        node.pod("lone", "app-lone", ip="10.1.2.50")
        update = await node.next()
        assert set(pods_of(update)) == {"10.1.2.50"}
        assert lull.asked == []  # sent without waiting
    finally:
        await node.updates.aclose()


async def test_with_a_linger_the_changes_that_follow_a_message_go_out_as_one() -> None:
    lull = Lull()
    node = Node(lull=lull, linger=0.05)
    try:
        await node.next()
        lull.now += 1
        node.pod("first", "app-burst", ip="10.1.2.60")
        assert set(pods_of(await node.next())) == {"10.1.2.60"}

        node.pod("second", "app-burst", ip="10.1.2.61")
        following = asyncio.ensure_future(node.next())
        await lull.sleeping()  # without a linger, the second pod would be on its way already
        assert lull.asked == [pytest.approx(0.05)]
        node.pod("third", "app-burst", ip="10.1.2.62")
        await asyncio.sleep(0)
        node.pod("fourth", "app-burst", ip="10.1.2.63")
        lull.end()
        update = await following
        assert set(pods_of(update)) == {"10.1.2.61", "10.1.2.62", "10.1.2.63"}
    finally:
        await node.updates.aclose()


async def lingering(lull: Lull) -> Node:
    """A stream with a linger, its snapshot read, a pod "held" on 10.1.2.80 (the agent serves
    it) sent after a quiet spell, and a message just sent, so the linger runs from now."""
    node = Node(lull=lull, linger=0.05)
    await node.next()
    lull.now += 1
    node.pod("held", "app-held", ip="10.1.2.80")
    assert set(pods_of(await node.next())) == {"10.1.2.80"}
    return node


async def within_the_linger(node: Node) -> kiam_pb2.NodeUpdate:
    """The next message, which must come while the linger has not run out (the test never
    ends the Lull's sleep): a change that takes an answer away does not wait."""
    return await asyncio.wait_for(anext(node.updates), 2)


async def test_with_a_linger_a_deleted_pods_ip_is_removed_at_once() -> None:
    lull = Lull()
    node = await lingering(lull)
    try:
        node.delete(pod_object("apps", "held", role="app-held", ip="10.1.2.80", host_ip=NODE))
        update = await within_the_linger(node)
        assert list(update.removed_ips) == ["10.1.2.80"]
        assert lull.asked == []
    finally:
        await node.updates.aclose()


async def test_with_a_linger_a_removal_takes_the_waiting_additions_with_it() -> None:
    lull = Lull()
    node = await lingering(lull)
    try:
        node.pod("new", "app-new", ip="10.1.2.81")
        following = asyncio.ensure_future(within_the_linger(node))
        await lull.sleeping()  # the addition waits for the linger...
        assert not following.done()
        node.delete(pod_object("apps", "held", role="app-held", ip="10.1.2.80", host_ip=NODE))
        update = await following  # ...until a removal goes out, and it goes along
        assert list(update.removed_ips) == ["10.1.2.80"]
        assert set(pods_of(update)) == {"10.1.2.81"}
    finally:
        await node.updates.aclose()


async def test_with_a_linger_an_ip_taken_by_another_pod_is_sent_at_once() -> None:
    lull = Lull()
    node = await lingering(lull)
    try:
        node.delete(pod_object("apps", "held", role="app-held", ip="10.1.2.80", host_ip=NODE))
        node.pod("successor", "app-successor", ip="10.1.2.80")
        update = await within_the_linger(node)
        state = pods_of(update)["10.1.2.80"]
        assert state.identity == identity("app-successor", "successor").key
    finally:
        await node.updates.aclose()


async def test_with_a_linger_a_pod_that_becomes_denied_is_sent_at_once() -> None:
    lull = Lull()
    node = await lingering(lull)
    try:
        node.pod("held", "not-permitted", ip="10.1.2.80")  # its role changed: denied now
        update = await within_the_linger(node)
        state = pods_of(update)["10.1.2.80"]
        assert state.denied and not state.identity
    finally:
        await node.updates.aclose()


async def test_with_a_linger_withdrawn_credentials_are_removed_at_once() -> None:
    lull = Lull()
    node = await lingering(lull)
    held = identity("app-held", "held")
    try:
        node.fanout.credentials_changed(held, credentials("held"))
        following = asyncio.ensure_future(node.next())
        await lull.sleeping()  # credentials given: they may wait for the linger
        lull.end()
        assert creds_of(await following) == {held.key: "ASIAHELD"}

        node.fanout.credentials_changed(held, None)  # withdrawn: that may not wait
        update = await within_the_linger(node)
        assert list(update.removed_identities) == [held.key]
        assert len(lull.asked) == 1
    finally:
        await node.updates.aclose()


async def test_with_a_linger_an_identity_no_pod_uses_is_removed_at_once() -> None:
    lull = Lull()
    node = Node(lull=lull, linger=0.05)
    held = identity("app-held", "held")
    node.fanout.credentials_changed(held, credentials("held"))
    obj = node.pod("held", "app-held", ip="10.1.2.80")
    try:
        snapshot = await node.next()
        assert creds_of(snapshot) == {held.key: "ASIAHELD"}
        node.delete(obj)  # right after the snapshot: well within the linger
        update = await within_the_linger(node)
        assert list(update.removed_ips) == ["10.1.2.80"]
        assert list(update.removed_identities) == [held.key]
    finally:
        await node.updates.aclose()


async def test_a_stream_lingering_ends_when_the_fan_out_closes() -> None:
    lull = Lull()
    node = Node(lull=lull, linger=0.05)
    await node.next()
    node.pod("late", "app-late", ip="10.1.2.70")
    ending = asyncio.ensure_future(node.next())
    await lull.sleeping()
    node.fanout.close()
    lull.end()
    with pytest.raises(StopAsyncIteration):
        await ending
    assert not node.fanout.watching


async def test_credentials_are_pushed_when_announced_refreshed_and_withdrawn(node: Node) -> None:
    node.pod("app", "app-app", ip="10.1.3.1")
    app = identity("app-app", "app")
    snapshot = await node.next()
    assert pods_of(snapshot)["10.1.3.1"].identity == app.key
    assert creds_of(snapshot) == {}  # not fetched yet

    node.fanout.credentials_changed(app, credentials("first"))
    assert creds_of(await node.next()) == {app.key: "ASIAFIRST"}

    node.fanout.credentials_changed(app, credentials("second"))  # a refresh
    assert creds_of(await node.next()) == {app.key: "ASIASECOND"}

    node.fanout.credentials_changed(app, None)  # expired while STS fails
    withdrawn = await node.next()
    assert list(withdrawn.removed_identities) == [app.key] and not withdrawn.credentials
    assert app not in node.messages


async def test_expired_credentials_are_never_pushed_even_before_the_cache_withdraws_them(
    node: Node,
) -> None:
    node.pod("stale", "app-stale", ip="10.1.3.9")
    stale = identity("app-stale", "stale")
    node.fanout.credentials_changed(stale, credentials("stale", lifetime=timedelta(seconds=-1)))
    snapshot = await node.next()
    assert pods_of(snapshot)["10.1.3.9"].identity == stale.key
    assert creds_of(snapshot) == {}


async def test_credentials_are_withdrawn_with_the_last_pod_that_uses_them(node: Node) -> None:
    obj = node.pod("leaving", "app-leaving", ip="10.1.4.1")
    leaving = identity("app-leaving", "leaving")
    node.fanout.credentials_changed(leaving, credentials("leaving"))
    assert creds_of(await node.next()) == {leaving.key: "ASIALEAVING"}

    node.delete(obj)
    update = await node.next()
    assert list(update.removed_ips) == ["10.1.4.1"]
    assert list(update.removed_identities) == [leaving.key]


async def test_announcements_for_identities_other_nodes_use_are_not_sent(node: Node) -> None:
    node.pod("remote", "app-remote", ip="10.1.5.1", host_ip=OTHER_NODE)
    await node.next()
    node.fanout.credentials_changed(identity("app-remote", "remote"), credentials("remote"))
    node.pod("local", "app-local", ip="10.1.5.2")
    update = await node.next()
    assert set(pods_of(update)) == {"10.1.5.2"} and not update.credentials


async def test_second_pod_on_an_ip_makes_it_ambiguous_and_withdraws_its_credentials(
    node: Node,
) -> None:
    node.pod("twin-a", "app-a", ip="10.1.6.1")
    first = identity("app-a", "twin-a")
    node.fanout.credentials_changed(first, credentials("a"))
    await node.next()

    twin = node.pod("twin-b", "app-b", ip="10.1.6.1", host_ip=OTHER_NODE)
    update = await node.next()
    state = pods_of(update)["10.1.6.1"]
    assert (state.reason, state.role, state.identity) == ("ambiguous-ip", "app-a", "")
    assert list(update.removed_identities) == [first.key]

    node.delete(twin)  # no longer ambiguous: the first pod has its identity back
    update = await node.next()
    assert pods_of(update)["10.1.6.1"].identity == first.key
    assert creds_of(update) == {first.key: "ASIAA"}


async def test_denied_pod_carries_its_reason(node: Node) -> None:
    node.pod("evil", "evil-x", ip="10.1.7.1")
    state = pods_of(await node.next())["10.1.7.1"]
    assert state.reason == "not-permitted" and state.identity == ""
    assert "is not permitted" in state.denied and state.role_arn == BASE + "evil-x"


async def test_stream_ends_when_the_fan_out_closes_and_unsubscribes() -> None:
    node = Node()
    streams = REGISTRY.get_sample_value("podiam_node_streams")
    await node.next()
    assert REGISTRY.get_sample_value("podiam_node_streams") == streams + 1
    node.fanout.close()
    with pytest.raises(StopAsyncIteration):
        await node.next()
    assert REGISTRY.get_sample_value("podiam_node_streams") == streams
    assert not node.fanout.watching


async def test_credentials_fetched_by_the_cache_reach_the_stream_and_leave_with_the_pod(
    moto_sts: MotoSts,
) -> None:
    gateway = StsGateway(
        region="us-east-1", endpoint_url=moto_sts.endpoint_url, boto_session=fake_session()
    )
    messages = CredentialMessages()
    fanout = NodeFanout(messages)
    cache = CredentialCache(gateway, on_update=fanout.credentials_changed)
    registry = Registry(
        resolver=RoleResolver(BASE),
        session_name=lambda pod: f"podiam-{pod.name}",
        credentials=cache,
        changes=fanout,
    )
    registry.namespace_sink.upsert(namespace_object("apps", "app-.*"))
    updates = NodeStream(pods=registry, fanout=fanout, host_ip=NODE).updates()
    try:
        await anext(updates)
        obj = pod_object("apps", "real", role="app-real", ip="10.1.8.1", host_ip=NODE)
        registry.pod_sink.upsert(obj)
        real = identity("app-real", "real")
        seen: dict[str, str] = {}
        while real.key not in seen:  # the pod first, then its prefetched credentials
            seen.update(creds_of(await asyncio.wait_for(anext(updates), 10)))
        assert seen[real.key] == cache.peek(real).access_key_id

        registry.pod_sink.delete(obj)
        update = await asyncio.wait_for(anext(updates), 5)
        assert list(update.removed_identities) == [real.key]
        await eventually(lambda: cache.peek(real) is None)
        assert len(messages) == 0 and real not in messages
    finally:
        await updates.aclose()
        await cache.close()
        gateway.close()
