"""The server end to end over real mutual-TLS gRPC: a real Kubernetes list/watch API, moto as
STS, real certificates. Each test uses its own pods and IPs on one module-wide server."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import kiam_pb2
from tests.support.moto_sts import caller_arn
from tests.support.objects import PERMITTED
from tests.support.pods import NODE, add_pod
from tests.support.server import BASE_ARN, as_aws, indexed, refused
from tests.support.waiting import eventually

OTHER_NODE = "10.99.0.1"


@pytest.fixture(scope="module")
def namespaces():
    return {"apps": "app-.*", "other": "other-.*", "closed": None, "empty": ""}


# ---- credentials and roles ------------------------------------------------------------------


async def test_permitted_pod_gets_credentials_for_its_own_role(podiam, kube, stub, moto_sts):
    ip = add_pod(kube, "apps", "web", "app-web")
    await indexed(podiam, ip)
    role = await stub.GetPodRole(kiam_pb2.GetPodRoleRequest(ip=ip))
    assert role.name == "app-web"
    creds = await stub.GetPodCredentials(kiam_pb2.GetPodCredentialsRequest(ip=ip, role="app-web"))
    assert creds.code == "Success" and creds.type == "AWS-HMAC"
    assert creds.expiration.endswith("Z") and "." not in creds.expiration
    left = as_aws(creds).seconds_left()
    assert 30 * 60 < left <= 3600
    who = await asyncio.to_thread(caller_arn, moto_sts.endpoint_url, as_aws(creds))
    assert who.endswith(":assumed-role/app-web/podiam-web")


async def test_full_arn_request_for_the_pods_role_is_the_same_role(podiam, kube, stub):
    ip = add_pod(kube, "apps", "arn-asker", "app-arn")
    await indexed(podiam, ip)
    request = kiam_pb2.GetPodCredentialsRequest(ip=ip, role=BASE_ARN + "app-arn")
    assert (await stub.GetPodCredentials(request)).access_key_id


async def test_session_name_annotation_and_external_id_reach_sts(podiam, kube, stub, moto_sts):
    annotations = {
        "iam.amazonaws.com/session-name": "billing job!",
        "iam.amazonaws.com/external-id": "ext-42",
    }
    ip = add_pod(kube, "apps", "job", "app-billing", annotations=annotations)
    await indexed(podiam, ip)
    await stub.GetPodCredentials(kiam_pb2.GetPodCredentialsRequest(ip=ip, role="app-billing"))
    calls = [c for c in moto_sts.calls() if c.role_arn == BASE_ARN + "app-billing"]
    assert [(c.session_name, c.external_id) for c in calls] == [("podiam-billing-job-", "ext-42")]


async def test_unknown_ip_is_not_found(stub):
    error = await refused(
        stub.GetPodCredentials(kiam_pb2.GetPodCredentialsRequest(ip="10.250.0.1", role="x"))
    )
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert "10.250.0.1" in error.details()


async def test_pod_without_role_has_no_role(podiam, kube, stub):
    ip = add_pod(kube, "apps", "plain", None)
    await indexed(podiam, ip)
    error = await refused(stub.GetPodRole(kiam_pb2.GetPodRoleRequest(ip=ip)))
    assert error.code() is grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("namespace", "role", "words"),
    [
        ("apps", "evil-app-x", "not permitted"),
        ("closed", "app-x", "no iam.amazonaws.com/permitted"),
        ("empty", "app-x", "no iam.amazonaws.com/permitted"),
        ("nowhere", "app-x", "not known"),
    ],
)
async def test_policy_denials_say_why_and_leave_an_event(
    podiam, kube, stub, namespace, role, words
):
    name = f"denied-{namespace}"
    ip = add_pod(kube, namespace, name, role)
    await indexed(podiam, ip)
    error = await refused(
        stub.GetPodCredentials(kiam_pb2.GetPodCredentialsRequest(ip=ip, role=role))
    )
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert words in error.details()
    if namespace != "nowhere":  # an Event needs its namespace to exist
        await eventually(
            lambda: any(
                e["involvedObject"]["name"] == name and e["type"] == "Warning" for e in kube.events
            )
        )


async def test_denial_events_are_not_repeated(podiam, kube, stub):
    ip = add_pod(kube, "apps", "repeat-offender", "evil-role")
    await indexed(podiam, ip)
    for _ in range(5):
        await refused(
            stub.GetPodCredentials(kiam_pb2.GetPodCredentialsRequest(ip=ip, role="evil-role"))
        )
    await podiam.server.recorder.drain()
    mine = [e for e in kube.events if e["involvedObject"]["name"] == "repeat-offender"]
    assert len(mine) == 1
    assert mine[0]["reason"] == "PodiamNotPermitted"


async def test_asking_for_another_role_than_annotated_is_denied(podiam, kube, stub):
    ip = add_pod(kube, "apps", "greedy", "app-small")
    await indexed(podiam, ip)
    error = await refused(
        stub.GetPodCredentials(kiam_pb2.GetPodCredentialsRequest(ip=ip, role="app-big"))
    )
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "not the pod's role" in error.details()


async def test_two_active_pods_on_one_ip_are_refused_not_guessed(podiam, kube, stub):
    ip = add_pod(kube, "apps", "twin-a", "app-a")
    add_pod(kube, "apps", "twin-b", "app-b", ip=ip)
    await eventually(
        lambda: (
            podiam.server.registry.lookup(ip).denial is not None
            and len(podiam.server.registry.pods_with_ip(ip)) == 2
        )
    )
    error = await refused(
        stub.GetPodCredentials(kiam_pb2.GetPodCredentialsRequest(ip=ip, role="app-a"))
    )
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "several pods" in error.details()


async def test_finished_pod_releases_its_ip(podiam, kube, stub):
    ip = add_pod(kube, "apps", "batch", "app-batch")
    await indexed(podiam, ip)
    kube.update_pod("apps", "batch", phase="Succeeded")
    await eventually(lambda: podiam.server.registry.lookup(ip).pod is None)
    error = await refused(
        stub.GetPodCredentials(kiam_pb2.GetPodCredentialsRequest(ip=ip, role="app-batch"))
    )
    assert error.code() is grpc.StatusCode.NOT_FOUND


async def test_host_network_pods_are_never_identified_by_ip(podiam, kube, stub):
    add_pod(kube, "apps", "hostnet", "app-host", ip=NODE, host_network=True)
    await eventually(lambda: ("apps", "hostnet") in podiam.server.registry.pods)
    error = await refused(
        stub.GetPodCredentials(kiam_pb2.GetPodCredentialsRequest(ip=NODE, role="app-host"))
    )
    assert error.code() is grpc.StatusCode.NOT_FOUND


# ---- STS economy ----------------------------------------------------------------------------


async def crowd(podiam, kube, stub, *, role: str, pods: int, session_name: str | None):
    """``pods`` pods with one role, then 200 concurrent credential requests spread over them."""
    annotations = {"iam.amazonaws.com/session-name": session_name} if session_name else {}
    ips = [add_pod(kube, "apps", f"{role}-{n}", role, annotations=annotations) for n in range(pods)]
    await eventually(lambda: all(podiam.server.registry.lookup(ip).pod for ip in ips))
    return await asyncio.gather(
        *(
            stub.GetPodCredentials(kiam_pb2.GetPodCredentialsRequest(ip=ips[n % pods], role=role))
            for n in range(200)
        )
    )


async def test_200_concurrent_requests_for_one_role_make_one_assume_role(
    podiam, kube, stub, moto_sts
):
    # Pods share credentials when they share the role identity: role, session name, external id.
    answers = await crowd(podiam, kube, stub, role="app-crowd", pods=20, session_name="crowd")
    assert len({a.access_key_id for a in answers}) == 1
    assert moto_sts.assume_role_calls(BASE_ARN + "app-crowd") == 1


async def test_pods_with_their_own_session_names_cost_one_assume_role_each(
    podiam, kube, stub, moto_sts
):
    # Without a shared session-name annotation each pod's session is named after the pod.
    answers = await crowd(podiam, kube, stub, role="app-named", pods=5, session_name=None)
    assert len({a.access_key_id for a in answers}) == 5
    assert moto_sts.assume_role_calls(BASE_ARN + "app-named") == 5


async def test_credentials_are_fetched_when_a_pod_appears_before_it_asks(podiam, kube, moto_sts):
    add_pod(kube, "apps", "early", "app-early")
    await eventually(lambda: moto_sts.assume_role_calls(BASE_ARN + "app-early") == 1)


async def test_sts_failure_is_unavailable_and_changes_nothing(podiam, kube, stub, moto_sts):
    moto_sts.set_failing(True, "AccessDenied")
    try:
        ip = add_pod(kube, "apps", "unlucky", "app-unlucky")
        await indexed(podiam, ip)
        error = await refused(
            stub.GetPodCredentials(kiam_pb2.GetPodCredentialsRequest(ip=ip, role="app-unlucky"))
        )
        assert error.code() is grpc.StatusCode.UNAVAILABLE
        assert "AccessDenied" in error.details()
    finally:
        moto_sts.set_failing(False)
    creds = await stub.GetPodCredentials(
        kiam_pb2.GetPodCredentialsRequest(ip=ip, role="app-unlucky")
    )
    assert creds.access_key_id


# ---- IP reuse, node binding, node stream ------------------------------------------------------


async def test_reused_ip_never_serves_the_deleted_pods_role(podiam, kube, stub):
    ip = add_pod(kube, "apps", "old-owner", "app-old")
    await indexed(podiam, ip)
    old = await stub.GetPodCredentials(kiam_pb2.GetPodCredentialsRequest(ip=ip, role="app-old"))

    kube.delete_pod("apps", "old-owner")
    add_pod(kube, "other", "new-owner", "other-new", ip=ip)
    await eventually(
        lambda: (p := podiam.server.registry.lookup(ip).pod) is not None and p.name == "new-owner"
    )

    error = await refused(
        stub.GetPodCredentials(kiam_pb2.GetPodCredentialsRequest(ip=ip, role="app-old"))
    )
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert (await stub.GetPodRole(kiam_pb2.GetPodRoleRequest(ip=ip))).name == "other-new"
    new = await stub.GetPodCredentials(kiam_pb2.GetPodCredentialsRequest(ip=ip, role="other-new"))
    assert new.access_key_id != old.access_key_id


async def test_agent_cannot_get_credentials_for_a_pod_on_another_node(podiam, kube, stub):
    ip = add_pod(kube, "apps", "elsewhere", "app-elsewhere", host_ip=OTHER_NODE)
    await indexed(podiam, ip)
    for call in (
        stub.GetPodCredentials(kiam_pb2.GetPodCredentialsRequest(ip=ip, role="app-elsewhere")),
        stub.GetPodRole(kiam_pb2.GetPodRoleRequest(ip=ip)),
    ):
        error = await refused(call)
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "not on the caller's node" in error.details()


async def test_agent_cannot_watch_another_node(stub):
    stream = stub.WatchNode(kiam_pb2.WatchNodeRequest(host_ip=OTHER_NODE))
    error = await refused(stream.read())
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED


class NodeView:
    """What an agent would hold after applying the node stream."""

    def __init__(self) -> None:
        self.pods: dict[str, kiam_pb2.PodState] = {}
        self.creds: dict[str, kiam_pb2.Credentials] = {}
        self.synced = False

    def apply(self, update: kiam_pb2.NodeUpdate) -> None:
        if update.reset:
            self.pods.clear()
            self.creds.clear()
        for ip in update.removed_ips:
            self.pods.pop(ip, None)
        for key in update.removed_identities:
            self.creds.pop(key, None)
        for state in update.pods:
            self.pods[state.ip] = state
        for item in update.credentials:
            self.creds[item.identity] = item.credentials
        self.synced = self.synced or update.synced

    def credentials_for(self, ip: str) -> kiam_pb2.Credentials | None:
        state = self.pods.get(ip)
        return self.creds.get(state.identity) if state and state.identity else None


@pytest_asyncio.fixture
async def node_view(stub):
    view = NodeView()
    stream = stub.WatchNode(kiam_pb2.WatchNodeRequest())

    async def follow():
        async for update in stream:
            view.apply(update)

    task = asyncio.create_task(follow())
    await eventually(lambda: view.synced)
    yield view
    stream.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_node_stream_pushes_pods_and_credentials_and_withdraws_them(podiam, kube, node_view):
    ip = add_pod(kube, "apps", "streamed", "app-streamed")
    await eventually(lambda: node_view.credentials_for(ip) is not None)
    assert node_view.pods[ip].role == "app-streamed"

    kube.delete_pod("apps", "streamed")
    await eventually(lambda: ip not in node_view.pods)

    def identity_gone():
        return not any(s.identity for s in node_view.pods.values() if s.role == "app-streamed")

    assert identity_gone()


async def test_node_stream_shows_only_this_nodes_pods(podiam, kube, node_view):
    here = add_pod(kube, "apps", "local", "app-local")
    there = add_pod(kube, "apps", "remote", "app-remote", host_ip=OTHER_NODE)
    await eventually(lambda: node_view.credentials_for(here) is not None)
    await indexed(podiam, there)
    assert there not in node_view.pods


async def test_node_stream_reused_ip_switches_to_the_new_pod(podiam, kube, node_view):
    ip = add_pod(kube, "apps", "stream-old", "app-stream-old")
    await eventually(lambda: node_view.credentials_for(ip) is not None)
    old_identity = node_view.pods[ip].identity

    kube.delete_pod("apps", "stream-old")
    add_pod(kube, "other", "stream-new", "other-stream-new", ip=ip)
    await eventually(lambda: ip in node_view.pods and node_view.pods[ip].role == "other-stream-new")
    await eventually(lambda: node_view.credentials_for(ip) is not None)
    assert node_view.pods[ip].identity != old_identity
    assert old_identity not in node_view.creds


async def test_namespace_policy_change_withdraws_credentials_at_once(podiam, kube, node_view):
    kube.add_namespace("fickle", annotations={PERMITTED: "fickle-.*"})
    ip = add_pod(kube, "fickle", "pod", "fickle-role")
    await eventually(lambda: node_view.credentials_for(ip) is not None)
    kube.update_namespace("fickle", annotations={PERMITTED: "nothing"})
    await eventually(lambda: node_view.pods[ip].denied != "")
    assert node_view.pods[ip].identity == ""
    assert node_view.credentials_for(ip) is None


async def test_node_stream_denied_pods_carry_the_reason(podiam, kube, node_view):
    ip = add_pod(kube, "closed", "shut-out", "app-x")
    await eventually(lambda: ip in node_view.pods)
    assert "no iam.amazonaws.com/permitted" in node_view.pods[ip].denied
    assert node_view.pods[ip].identity == ""


# ---- Kubernetes watch trouble ------------------------------------------------------------------


async def test_index_is_exact_after_410_gone_with_deletions_missed(podiam, kube, stub):
    keep = add_pod(kube, "apps", "survivor", "app-survivor")
    gone = add_pod(kube, "apps", "casualty", "app-casualty")
    await indexed(podiam, gone)
    lists_before = kube.list_requests["pods"]
    await eventually(lambda: kube.watching("pods"))  # else the drop would break nothing
    kube.drop_watches()
    kube.delete_pod("apps", "casualty")
    added = add_pod(kube, "apps", "newcomer", "app-newcomer")
    kube.compact()  # the watch cannot resume: its resourceVersion is gone
    await eventually(lambda: kube.list_requests["pods"] > lists_before, timeout=15)
    await eventually(lambda: podiam.server.registry.lookup(added).pod is not None, timeout=15)
    registry = podiam.server.registry
    assert registry.lookup(gone).pod is None
    assert registry.lookup(keep).pod is not None
    expected = {
        (p["metadata"]["namespace"], p["metadata"]["name"])
        for p in kube.store.objects["pods"].values()
        if p["status"].get("phase") not in ("Succeeded", "Failed")
    }
    assert set(registry.pods) == expected


async def test_dropped_watch_resumes_without_losing_changes(podiam, kube):
    await eventually(lambda: kube.watching("pods"))  # else the drop would break nothing
    watches_before = kube.watch_requests["pods"]
    kube.drop_watches()
    ip = add_pod(kube, "apps", "while-away", "app-away")
    await eventually(lambda: podiam.server.registry.lookup(ip).pod is not None, timeout=15)
    assert kube.watch_requests["pods"] > watches_before  # it came by a new watch


# ---- health and TLS ------------------------------------------------------------------------


async def test_health_answers_on_kiam_and_standard_grpc_health(podiam, stub):
    assert (await stub.GetHealth(kiam_pb2.GetHealthRequest())).message == "ok"
    async with podiam.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service="kiam.KiamService"))
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_client_without_certificate_is_refused(podiam):
    ca = podiam.tls.agent.ca.read_bytes()
    async with grpc.aio.secure_channel(podiam.target, grpc.ssl_channel_credentials(ca)) as channel:
        stub = podiam.stub(channel)
        error = await refused(stub.GetHealth(kiam_pb2.GetHealthRequest(), timeout=5))
    assert error.code() is grpc.StatusCode.UNAVAILABLE


async def test_client_certificate_from_another_ca_is_refused(podiam):
    async with podiam.channel(podiam.tls.foreign_agent) as channel:
        error = await refused(
            podiam.stub(channel).GetHealth(kiam_pb2.GetHealthRequest(), timeout=5)
        )
    assert error.code() is grpc.StatusCode.UNAVAILABLE
