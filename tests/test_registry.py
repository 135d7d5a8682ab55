"""The registry on its own: raw pod and namespace objects in through its reflector sinks, and
what it then answers, holds in the credentials cache, publishes to the node fan-out and reports
as denials.

Its three collaborators are recording implementations of the small interfaces the registry
declares (server/registry.py): they are not the code under test, and record exactly what the
registry asked of them.
"""

from __future__ import annotations

from collections import Counter

import pytest

from server.arn import RoleResolver
from server.identity import RoleIdentity
from server.pods import NamespaceRecord, PodRecord
from server.policy import Denial, Reason
from server.registry import Registry
from tests.support.objects import namespace_object, pod_object

BASE = "arn:aws:iam::123456789012:role/"
NODE = "10.0.0.1"
OTHER_NODE = "10.0.0.2"
UNLISTED_ACCOUNT = "555555555555"


class Holder:
    """The credentials cache's reference counts, as the registry moves them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, RoleIdentity]] = []
        self.counts: Counter[RoleIdentity] = Counter()

    def acquire(self, identity: RoleIdentity) -> None:
        self.calls.append(("acquire", identity))
        self.counts[identity] += 1

    def release(self, identity: RoleIdentity) -> None:
        self.calls.append(("release", identity))
        assert self.counts[identity] > 0, f"release of {identity} which is not held"
        self.counts[identity] -= 1

    @property
    def held(self) -> set[RoleIdentity]:
        return {identity for identity, count in self.counts.items() if count > 0}


class Changes:
    """The node fan-out's publishing side."""

    def __init__(self, watching: bool = True) -> None:
        self.watching = watching
        self.published: list[tuple[str, frozenset[str]]] = []
        self.uses: Counter[tuple[str, RoleIdentity]] = Counter()  # summed announcements

    def ip_changed(self, ip: str, hosts) -> None:
        self.published.append((ip, frozenset(hosts)))

    def identity_used(self, host_ip: str, identity: RoleIdentity, count: int) -> None:
        self.uses[(host_ip, identity)] += count

    def uses_on(self, host_ip: str) -> dict[RoleIdentity, int]:
        return {i: n for (host, i), n in self.uses.items() if host == host_ip and n}

    def take(self) -> dict[str, frozenset[str]]:
        found: dict[str, frozenset[str]] = {}
        for ip, hosts in self.published:
            found[ip] = found.get(ip, frozenset()) | hosts
        self.published.clear()
        return found


class Denials:
    """The Event recorder."""

    def __init__(self) -> None:
        self.pods: list[tuple[PodRecord, Denial]] = []
        self.namespaces: list[tuple[NamespaceRecord, Denial]] = []

    def record(self, pod: PodRecord, denial: Denial) -> None:
        self.pods.append((pod, denial))

    def record_namespace(self, namespace: NamespaceRecord, denial: Denial) -> None:
        self.namespaces.append((namespace, denial))

    def reasons(self, name: str) -> list[Reason]:
        return [denial.reason for pod, denial in self.pods if pod.name == name]


class World:
    def __init__(self, *, watching: bool = True) -> None:
        self.holder = Holder()
        self.changes = Changes(watching)
        self.denials = Denials()
        self.registry = Registry(
            resolver=RoleResolver(BASE),
            session_name=lambda pod: f"podiam-{pod.session_name or pod.name}",
            credentials=self.holder,
            changes=self.changes,
            denials=self.denials,
        )

    def namespace(self, name: str, permitted: str | None = "app-.*") -> None:
        self.registry.namespace_sink.upsert(namespace_object(name, permitted))

    def pod(self, name: str, role: str | None = "app-x", *, namespace: str = "apps", **kw) -> dict:
        kw.setdefault("host_ip", NODE)
        obj = pod_object(namespace, name, role=role, **kw)
        self.registry.pod_sink.upsert(obj)
        return obj

    def delete(self, obj: dict) -> None:
        self.registry.pod_sink.delete(obj)


@pytest.fixture
def world() -> World:
    world = World()
    world.namespace("apps")
    return world


def identity(role: str, session: str) -> RoleIdentity:
    return RoleIdentity(BASE + role, f"podiam-{session}")


# ---- lookups ------------------------------------------------------------------------------------


def test_permitted_pod_is_found_by_its_ip_with_its_identity(world: World) -> None:
    world.pod("web", "app-web", ip="10.1.0.1")
    found = world.registry.lookup("10.1.0.1")
    assert found.pod is not None and found.pod.name == "web"
    assert found.grant.identity == identity("app-web", "web")
    assert found.denial is None


def test_unknown_ip_is_unknown_pod(world: World) -> None:
    found = world.registry.lookup("10.1.0.99")
    assert found.pod is None and found.denial.reason is Reason.UNKNOWN_POD


def test_two_active_pods_on_one_ip_name_neither(world: World) -> None:
    world.pod("twin-a", "app-a", ip="10.1.0.2")
    world.pod("twin-b", "app-b", ip="10.1.0.2", host_ip=OTHER_NODE)
    found = world.registry.lookup("10.1.0.2")
    assert found.pod is None and found.denial.reason is Reason.AMBIGUOUS_IP
    assert "apps/twin-a" in found.denial.message and "apps/twin-b" in found.denial.message
    assert len(world.registry.pods_with_ip("10.1.0.2")) == 2
    # Each node's agent knows a pod is there, but is given no identity for it.
    pod, grant = world.registry.state_on_node("10.1.0.2", NODE)
    assert pod.name == "twin-a" and grant is None
    assert world.registry.node_identities(NODE) == set()


def test_hostnetwork_pod_is_never_found_by_ip_and_holds_no_identity(world: World) -> None:
    world.pod("daemon", "app-daemon", ip=NODE, host_network=True)
    assert world.registry.lookup(NODE).pod is None
    assert ("apps", "daemon") in world.registry.pods
    assert world.holder.held == set()


def test_finished_pod_gives_up_its_ip_and_identity(world: World) -> None:
    obj = world.pod("batch", "app-batch", ip="10.1.0.3")
    assert world.holder.held == {identity("app-batch", "batch")}
    obj["status"]["phase"] = "Succeeded"
    world.registry.pod_sink.upsert(obj)
    assert world.registry.lookup("10.1.0.3").pod is None
    assert ("apps", "batch") not in world.registry.pods
    assert world.holder.held == set()


def test_node_lists_only_its_own_active_pods(world: World) -> None:
    world.pod("here", "app-here", ip="10.1.0.4")
    world.pod("there", "app-there", ip="10.1.0.5", host_ip=OTHER_NODE)
    world.pod("waiting", "app-waiting", ip="")  # no IP yet
    assert list(world.registry.node_ips(NODE)) == ["10.1.0.4"]
    assert world.registry.node_identities(NODE) == {identity("app-here", "here")}
    assert world.registry.state_on_node("10.1.0.5", NODE) == (None, None)


def test_pod_is_found_by_name_with_its_grant_whether_or_not_it_has_an_ip(world: World) -> None:
    world.pod("named", "app-named", ip="10.1.0.6")
    world.pod("pending", "app-pending", ip="", phase="Pending")
    pod, grant = world.registry.pod("apps", "named")
    assert pod.ip == "10.1.0.6" and grant.identity == identity("app-named", "named")
    pod, grant = world.registry.pod("apps", "pending")
    assert pod.ip == "" and grant.identity == identity("app-pending", "pending")
    # Only a stored pod has a grant: a name the registry does not hold has neither.
    assert world.registry.pod("apps", "nobody") == (None, None)
    assert world.registry.pod("other", "named") == (None, None)


# ---- credentials held in the cache -------------------------------------------------------------


def test_pod_holds_its_identity_before_it_has_an_ip(world: World) -> None:
    world.pod("early", "app-early", ip="")
    assert world.holder.held == {identity("app-early", "early")}
    assert world.registry.lookup("").pod is None


def test_pods_sharing_an_identity_hold_it_until_the_last_one_goes(world: World) -> None:
    shared = {"iam.amazonaws.com/session-name": "workers"}
    first = world.pod("worker-1", "app-work", ip="10.1.1.1", annotations=shared)
    second = world.pod("worker-2", "app-work", ip="10.1.1.2", annotations=shared)
    workers = identity("app-work", "workers")
    assert world.holder.counts[workers] == 2
    world.delete(first)
    assert world.holder.held == {workers}
    world.delete(second)
    assert world.holder.held == set()


def test_update_keeping_the_identity_does_not_touch_the_cache(world: World) -> None:
    obj = world.pod("steady", "app-steady", ip="", phase="Pending")
    obj["status"].update(phase="Running", podIP="10.1.1.3")
    world.holder.calls.clear()
    world.registry.pod_sink.upsert(obj)
    assert world.registry.lookup("10.1.1.3").pod is not None
    assert world.holder.calls == []


def test_changed_role_takes_the_new_identity_before_releasing_the_old(world: World) -> None:
    obj = world.pod("switch", "app-one", ip="10.1.1.4")
    obj["metadata"]["annotations"]["iam.amazonaws.com/role"] = "app-two"
    world.holder.calls.clear()
    world.registry.pod_sink.upsert(obj)
    assert world.holder.calls == [
        ("acquire", identity("app-two", "switch")),
        ("release", identity("app-one", "switch")),
    ]


def test_namespace_change_regrants_its_pods_and_releases_what_is_no_longer_permitted(
    world: World,
) -> None:
    world.pod("fickle", "app-fickle", ip="10.1.1.5")
    world.namespace("apps", "nothing")
    found = world.registry.lookup("10.1.1.5")
    assert found.grant.identity is None and found.grant.denial.reason is Reason.NOT_PERMITTED
    assert world.holder.held == set()
    world.namespace("apps", "app-.*")
    assert world.registry.lookup("10.1.1.5").grant.identity == identity("app-fickle", "fickle")
    assert world.holder.held == {identity("app-fickle", "fickle")}


def test_relist_deletes_pods_that_were_not_listed_again(world: World) -> None:
    keep = pod_object("apps", "keep", role="app-keep", ip="10.1.2.1", host_ip=NODE)
    world.registry.pod_sink.upsert(keep)
    world.pod("gone", "app-gone", ip="10.1.2.2")
    sink = world.registry.pod_sink
    sink.begin_relist()
    sink.upsert(keep)
    sink.end_relist()
    assert set(world.registry.pods) == {("apps", "keep")}
    assert world.registry.lookup("10.1.2.2").pod is None
    assert world.holder.held == {identity("app-keep", "keep")}


# ---- publishing to the node fan-out ----------------------------------------------------------


def test_every_node_that_held_or_holds_an_ip_hears_of_its_change(world: World) -> None:
    old = world.pod("old-owner", "app-a", ip="10.1.3.1")
    assert world.changes.take() == {"10.1.3.1": {NODE}}
    world.delete(old)
    world.pod("new-owner", "app-b", ip="10.1.3.1", host_ip=OTHER_NODE)
    assert world.changes.take() == {"10.1.3.1": {NODE, OTHER_NODE}}
    # A second pod on the IP makes it ambiguous for the first one's node too.
    world.pod("intruder", "app-c", ip="10.1.3.1")
    assert world.changes.take() == {"10.1.3.1": {NODE, OTHER_NODE}}


def test_pod_moving_to_a_new_ip_publishes_both(world: World) -> None:
    obj = world.pod("mover", "app-m", ip="10.1.3.2")
    world.changes.take()
    obj["status"]["podIP"] = "10.1.3.3"
    world.registry.pod_sink.upsert(obj)
    assert world.changes.take() == {"10.1.3.2": {NODE}, "10.1.3.3": {NODE}}


def test_identity_uses_announced_add_up_to_what_each_nodes_pods_are_granted(
    world: World,
) -> None:
    def agree() -> None:
        for host in (NODE, OTHER_NODE):
            assert world.changes.uses_on(host) == world.registry.node_identity_uses(host)

    shared = {"iam.amazonaws.com/session-name": "workers"}
    first = world.pod("worker-1", "app-work", ip="10.1.4.1", annotations=shared)
    world.pod("worker-2", "app-work", ip="10.1.4.2", annotations=shared)
    agree()
    assert world.changes.uses_on(NODE) == {identity("app-work", "workers"): 2}
    # A pod elsewhere on worker-1's IP makes it ambiguous: it names no identity on either node.
    intruder = world.pod("intruder", "app-x", ip="10.1.4.1", host_ip=OTHER_NODE)
    agree()
    assert world.changes.uses_on(NODE) == {identity("app-work", "workers"): 1}
    world.delete(intruder)
    agree()
    first["status"]["podIP"] = "10.1.4.3"  # moves to another IP
    world.registry.pod_sink.upsert(first)
    agree()
    first["metadata"]["annotations"]["iam.amazonaws.com/role"] = "app-other"
    world.registry.pod_sink.upsert(first)
    agree()
    world.namespace("apps", permitted="app-work")  # app-other is no longer permitted
    agree()
    assert world.changes.uses_on(NODE) == {identity("app-work", "workers"): 1}
    world.pod("daemon", "app-work", ip=NODE, host_network=True)
    world.delete(first)
    agree()
    assert world.changes.uses_on(OTHER_NODE) == {}


def test_nothing_is_worked_out_for_the_fan_out_while_no_stream_watches() -> None:
    world = World(watching=False)
    world.namespace("apps")
    world.pod("lonely", "app-l", ip="10.1.3.4")
    assert world.changes.published == []
    assert world.registry.lookup("10.1.3.4").pod is not None


# ---- denials: each reported once, when the grant decides it ---------------------------------


POD_LEVEL_DENIALS = [
    # (reason, namespace permitted or None for no namespace object, role)
    (Reason.INVALID_ROLE, "app-.*", "app-x/../admin"),
    (Reason.ACCOUNT_NOT_ALLOWED, ".*", f"arn:aws:iam::{UNLISTED_ACCOUNT}:role/anything"),
    (Reason.NO_PERMITTED, "", "app-x"),
    (Reason.INVALID_PERMITTED, r"(app)-\1", "app-app"),
    (Reason.NOT_PERMITTED, "app-.*", "evil-x"),
]


@pytest.mark.parametrize(("reason", "permitted", "role"), POD_LEVEL_DENIALS)
def test_each_pod_level_denial_is_reported_once_however_often_the_pod_changes(
    reason: Reason, permitted: str | None, role: str
) -> None:
    world = World()
    if permitted is not None:
        world.namespace("team", permitted or None)
    obj = world.pod("denied", role, namespace="team", ip="10.2.0.1", phase="Pending")
    for phase, ip in (("Running", "10.2.0.1"), ("Running", "10.2.0.2"), ("Running", "10.2.0.3")):
        obj["status"].update(phase=phase, podIP=ip)
        world.registry.pod_sink.upsert(obj)
    if permitted is not None:
        # Another change to the namespace re-grants the pod to the same denial.
        world.registry.namespace_sink.upsert(namespace_object("team", permitted or None))
    assert world.denials.reasons("denied") == [reason]
    assert world.registry.lookup("10.2.0.3").grant.denial.reason is reason


def test_pod_seen_before_its_namespace_leaves_no_event_once_permitted(world: World) -> None:
    # Pods and namespaces come on separate watches: a pod may arrive first. That denial is
    # transient, and an Event for it would stay on a pod that is permitted a moment later.
    world.pod("early", "app-early", namespace="later", ip="10.2.0.9")
    assert world.registry.lookup("10.2.0.9").grant.denial.reason is Reason.UNKNOWN_NAMESPACE
    world.namespace("later", "app-.*")
    assert world.registry.lookup("10.2.0.9").grant.denial is None
    assert world.denials.pods == []


def test_pod_without_a_role_is_never_reported(world: World) -> None:
    world.pod("plain", None, ip="10.2.1.1")
    assert world.registry.lookup("10.2.1.1").grant.denial.reason is Reason.NO_ROLE
    assert world.denials.pods == []


def test_pod_without_an_ip_is_reported_once_it_has_one(world: World) -> None:
    obj = world.pod("late", "evil-late", ip="", phase="Pending")
    assert world.denials.pods == []  # not active: no request can name it yet
    obj["status"].update(phase="Running", podIP="10.2.1.2")
    world.registry.pod_sink.upsert(obj)
    assert world.denials.reasons("late") == [Reason.NOT_PERMITTED]


def test_denial_is_reported_again_when_its_reason_changes(world: World) -> None:
    world.pod("shifting", "evil-s", ip="10.2.1.3")
    world.registry.namespace_sink.delete(namespace_object("apps"))
    world.namespace("apps", "")
    # The namespace's absence in between is not reported (see the test above).
    assert world.denials.reasons("shifting") == [Reason.NOT_PERMITTED, Reason.NO_PERMITTED]


def test_pod_recreated_under_the_same_name_is_reported_again(world: World) -> None:
    first = world.pod("phoenix", "evil-p", ip="10.2.1.4")
    world.pod("phoenix", "evil-p", ip="10.2.1.4")  # same name, new uid: a new pod
    assert first["metadata"]["uid"] != world.registry.pods[("apps", "phoenix")].uid
    assert world.denials.reasons("phoenix") == [Reason.NOT_PERMITTED, Reason.NOT_PERMITTED]


def test_uncompilable_pattern_is_reported_on_the_namespace_once_per_pattern(world: World) -> None:
    world.namespace("echo", r"(a)\1")
    world.namespace("echo", r"(a)\1")  # the same pattern again: not a new report
    world.namespace("echo", r"(b)\1")
    world.namespace("echo", "fine-.*")
    reported = [(ns.name, ns.permitted, d.reason) for ns, d in world.denials.namespaces]
    assert reported == [
        ("echo", r"(a)\1", Reason.INVALID_PERMITTED),
        ("echo", r"(b)\1", Reason.INVALID_PERMITTED),
    ]


def test_replicas_share_one_grant_and_identity_until_their_namespace_changes(
    world: World,
) -> None:
    # What keeps 550,000 pods in memory: equal grants in a namespace are one object.
    world.namespace("shop")
    for n in range(3):
        world.pod(f"web-{n}", "app-web", namespace="shop", ip=f"10.3.0.{n}",
                  annotations={"iam.amazonaws.com/session-name": "web"})  # fmt: skip
    grants = [world.registry.lookup(f"10.3.0.{n}").grant for n in range(3)]
    assert grants[0] is grants[1] is grants[2]
    assert grants[0].identity.session_name == "podiam-web"

    world.registry.namespace_sink.upsert(namespace_object("shop", "other-.*"))
    after = [world.registry.lookup(f"10.3.0.{n}").grant for n in range(3)]
    assert {grant.denial.reason for grant in after} == {Reason.NOT_PERMITTED}
    world.namespace("shop")
    regranted = world.registry.lookup("10.3.0.0").grant
    assert regranted.identity == grants[0].identity
    assert world.holder.held == {grants[0].identity}


def test_pods_in_other_namespaces_never_share_a_grant(world: World) -> None:
    world.namespace("a")
    world.namespace("b", "nothing-.*")
    world.pod("one", "app-x", namespace="a", ip="10.3.1.1",
              annotations={"iam.amazonaws.com/session-name": "same"})  # fmt: skip
    world.pod("two", "app-x", namespace="b", ip="10.3.1.2",
              annotations={"iam.amazonaws.com/session-name": "same"})  # fmt: skip
    assert world.registry.lookup("10.3.1.1").grant.denial is None
    assert world.registry.lookup("10.3.1.2").grant.denial.reason is Reason.NOT_PERMITTED
