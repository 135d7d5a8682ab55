"""Static stability on loopback: an agent following two real server replicas keeps answering
when one goes, and keeps answering cached pods, within the stale rules, when all are gone.

The merge rules for two streams that disagree are shown on NodeState itself, fed the same
NodeUpdate messages a server sends (tests/test_netns_stable.py shows the route evidence with
real veths in network namespaces).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from datetime import UTC, datetime, timedelta

import pytest_asyncio

from agent.state import Mode, NodeState
from protos import kiam_pb2
from server.identity import AwsCredentials
from tests.support.agent import NODE, pod_session, running_agent
from tests.support.kubeapi import KubeApiServer
from tests.support.moto_sts import caller_arn
from tests.support.server import BASE_ARN, running_server
from tests.support.tcpproxy import TcpProxy
from tests.support.waiting import eventually

PERMITTED = "iam.amazonaws.com/permitted"
ROLE = "iam.amazonaws.com/role"
CREDS = "/latest/meta-data/iam/security-credentials/"
_ips = (f"127.0.{n // 250 + 20}.{n % 250 + 1}" for n in itertools.count())


@pytest_asyncio.fixture(scope="module")
async def kube():
    async with KubeApiServer() as kube:
        kube.add_namespace("apps", annotations={PERMITTED: "app-.*"})
        yield kube


@contextlib.asynccontextmanager
async def replicas(kube, moto_sts, tls_dirs, tmp_path, count: int = 2):
    async with contextlib.AsyncExitStack() as stack:
        runs = [
            await stack.enter_async_context(
                running_server(kube, moto_sts, tls_dirs, tmp_path / f"r{n}")
            )
            for n in range(count)
        ]
        yield runs


def mkdirs(tmp_path, count: int = 2):
    for n in range(count):
        (tmp_path / f"r{n}").mkdir()


@contextlib.asynccontextmanager
async def agent_on(runs, moto_sts, tls_dirs, *extra: str):
    address = ",".join(f"127.0.0.1:{run.server.port}" for run in runs)
    async with running_agent(
        server_port=runs[0].server.port,
        tls=tls_dirs,
        metadata=moto_sts.endpoint_url,
        extra=["--server-address", address, *extra],
    ) as agent:
        await asyncio.wait_for(agent.streams.synced_once.wait(), 15)
        yield agent


def add_pod(kube, name: str, role: str) -> str:
    ip = next(_ips)
    kube.add_pod("apps", name, ip=ip, host_ip=NODE, annotations={ROLE: role})
    return ip


async def get(agent, ip: str, path: str) -> tuple[int, str]:
    async with pod_session(ip) as http:
        async with http.get(f"http://{NODE}:{agent.port}{path}") as response:
            return response.status, await response.text()


async def cached(agent, ip: str, role: str) -> dict:
    """Ask until the pod's credentials come from the agent's memory, brought by every live
    stream: each replica fetches its own, and a stream lost before its replica's fetch ended
    takes no credentials with it into the stale state (the others may not have them yet)."""
    await eventually(lambda: agent.state.usable_entry(ip) is not None)
    entry = agent.state.usable_entry(ip)
    await eventually(lambda: agent.state.usable_credentials(entry.identity) is not None)
    await eventually(
        lambda: all(entry.identity in view.credentials for view in agent.state.views if view.live)
    )
    status, body = await get(agent, ip, CREDS + role)
    assert status == 200, body
    return json.loads(body)


def _as_aws(document: dict) -> AwsCredentials:
    expiration = datetime.strptime(document["Expiration"], "%Y-%m-%dT%H:%M:%SZ")
    return AwsCredentials(
        document["AccessKeyId"], document["SecretAccessKey"], document["Token"],
        expiration.replace(tzinfo=UTC), datetime.now(UTC),
    )  # fmt: skip


async def under_load(agent, pods: dict[str, str], stop: asyncio.Event) -> list[int]:
    """Each pod asks for its credentials over and over until ``stop``; every status."""
    statuses: list[int] = []

    async def one(ip: str, role: str) -> None:
        async with pod_session(ip) as http:
            while not stop.is_set():
                async with http.get(f"http://{NODE}:{agent.port}{CREDS}{role}") as response:
                    await response.read()
                    statuses.append(response.status)
                await asyncio.sleep(0.01)

    await asyncio.gather(*(one(ip, role) for ip, role in pods.items()))
    return statuses


async def test_losing_one_of_two_replicas_fails_no_request_and_calls_sts_no_more(
    kube, moto_sts, tls_dirs, tmp_path
):
    mkdirs(tmp_path)
    async with replicas(kube, moto_sts, tls_dirs, tmp_path) as runs:
        async with agent_on(runs, moto_sts, tls_dirs) as agent:
            await eventually(lambda: agent.state.mode is Mode.LIVE, timeout=15)
            pods = {add_pod(kube, f"pair-{n}", f"app-pair-{n}"): f"app-pair-{n}" for n in range(3)}
            for ip, role in pods.items():
                await cached(agent, ip, role)
            assumed = moto_sts.assume_role_calls()
            stop = asyncio.Event()
            load = asyncio.create_task(under_load(agent, pods, stop))
            await asyncio.sleep(0.5)
            # The replica the first stream follows goes away in the middle of the load.
            followed = agent.streams.followers[0].endpoint
            victim = next(run for run in runs if run.server.port == followed.port)
            await victim.server.stop(grace=0)
            await eventually(lambda: agent.state.mode is Mode.ONE_STREAM, timeout=10)
            await asyncio.sleep(1.0)
            stop.set()
            statuses = await load
            assert statuses and set(statuses) == {200}, sorted(set(statuses))
            assert moto_sts.assume_role_calls() == assumed


async def test_unary_fallback_goes_to_the_live_replica(kube, moto_sts, tls_dirs, tmp_path):
    mkdirs(tmp_path)
    async with replicas(kube, moto_sts, tls_dirs, tmp_path) as runs:
        async with agent_on(runs, moto_sts, tls_dirs) as agent:
            await eventually(lambda: agent.state.mode is Mode.LIVE, timeout=15)
            await runs[0].server.stop(grace=0)
            await eventually(lambda: agent.state.mode is Mode.ONE_STREAM, timeout=10)
            # Asked directly, as a request the stream cannot answer would: every call reaches
            # the replica still up, none the dead one.
            ip = add_pod(kube, "fallback", "app-fallback")
            await eventually(lambda: runs[1].server.registry.lookup(ip).pod is not None)
            for _ in range(10):
                assert await agent.streams.client.pod_role(ip, seconds=5) == "app-fallback"


async def test_with_no_server_cached_pods_keep_their_credentials(
    kube, moto_sts, tls_dirs, tmp_path
):
    mkdirs(tmp_path)
    async with replicas(kube, moto_sts, tls_dirs, tmp_path) as runs:
        async with agent_on(runs, moto_sts, tls_dirs) as agent:
            pods = {add_pod(kube, f"kept-{n}", f"app-kept-{n}"): f"app-kept-{n}" for n in range(3)}
            for ip, role in pods.items():
                await cached(agent, ip, role)
            for run in runs:
                await run.server.stop(grace=0)
            await eventually(lambda: agent.state.mode is Mode.STALE, timeout=10)
            stop = asyncio.Event()
            load = asyncio.create_task(under_load(agent, pods, stop))
            await asyncio.sleep(1.5)
            stop.set()
            statuses = await load
            assert statuses and set(statuses) == {200}, sorted(set(statuses))
            for ip, role in pods.items():
                status, body = await get(agent, ip, CREDS + role)
                assert status == 200
                document = json.loads(body)
                expiration = datetime.strptime(document["Expiration"], "%Y-%m-%dT%H:%M:%SZ")
                assert expiration.replace(tzinfo=UTC) - datetime.now(UTC) > timedelta(minutes=30)
                # What a replica handed out (the two replicas each hold their own set).
                who = await asyncio.to_thread(caller_arn, moto_sts.endpoint_url, _as_aws(document))
                assert f":assumed-role/{role}/" in who


async def test_new_pod_during_outage_is_refused_fast_with_reason(
    kube, moto_sts, tls_dirs, tmp_path
):
    mkdirs(tmp_path)
    async with replicas(kube, moto_sts, tls_dirs, tmp_path) as runs:
        async with agent_on(runs, moto_sts, tls_dirs) as agent:
            old = add_pod(kube, "before-outage", "app-before")
            await cached(agent, old, "app-before")
            for run in runs:
                await run.server.stop(grace=0)
            await eventually(lambda: agent.state.mode is Mode.STALE, timeout=10)
            new = add_pod(kube, "during-outage", "app-during")

            # Once the agent has seen every replica refuse a connection, it says so at once
            # (no wait on a stream that is gone, no unary call bound to fail).
            async def refused_with_reason() -> bool:
                status, body = await get(agent, new, CREDS)
                assert status == 503, (status, body)
                return "no podiam server is reachable" in body

            await eventually(refused_with_reason, timeout=10)
            status, body = await get(agent, new, CREDS + "app-during")
            assert status == 503 and "no podiam server is reachable" in body
            assert (await get(agent, old, CREDS + "app-before"))[0] == 200


async def test_new_pod_during_a_partition_is_refused_fast_with_reason(
    kube, moto_sts, tls_dirs, tmp_path
):
    # A partition refuses nothing: packets vanish and the connections look open. The agent's
    # keepalive pings notice within seconds; from then on a new pod hears "no server" at once
    # rather than waiting out --pod-wait for a 504.
    mkdirs(tmp_path, 1)
    async with replicas(kube, moto_sts, tls_dirs, tmp_path, count=1) as runs:
        async with TcpProxy("127.0.0.1", runs[0].server.port) as network:
            async with running_agent(
                server_port=network.port, tls=tls_dirs, metadata=moto_sts.endpoint_url
            ) as agent:
                await asyncio.wait_for(agent.streams.synced_once.wait(), 15)
                old = add_pod(kube, "before-partition", "app-before")
                await cached(agent, old, "app-before")
                network.stall()
                await eventually(lambda: not agent.state.live, timeout=20)
                new = add_pod(kube, "during-partition", "app-during")
                status, body = await get(agent, new, CREDS + "app-during")
                assert status == 503 and "no podiam server is reachable" in body, (status, body)
                assert (await get(agent, old, CREDS + "app-before"))[0] == 200
                network.flow()
                await eventually(lambda: agent.state.live, timeout=20)
                await eventually(lambda: agent.state.usable_entry(new) is not None, timeout=10)


async def test_without_route_evidence_stale_service_ends_after_grace(
    kube, moto_sts, tls_dirs, tmp_path
):
    mkdirs(tmp_path)
    async with replicas(kube, moto_sts, tls_dirs, tmp_path) as runs:
        async with agent_on(runs, moto_sts, tls_dirs, "--stale-grace", "2s") as agent:
            ip = add_pod(kube, "graced", "app-graced")
            await cached(agent, ip, "app-graced")
            for run in runs:
                await run.server.stop(grace=0)
            await eventually(lambda: agent.state.mode is Mode.STALE, timeout=10)
            # Loopback "pods" have no host route on an eni interface: no evidence, so only
            # the grace period vouches for the IP.
            assert agent.routes.interface(ip) is None
            assert (await get(agent, ip, CREDS + "app-graced"))[0] == 200

            async def refused() -> bool:
                return (await get(agent, ip, CREDS + "app-graced"))[0] == 503

            await eventually(refused, timeout=10)
            assert (await get(agent, ip, CREDS))[0] == 503


async def test_health_deep_reports_the_mode(kube, moto_sts, tls_dirs, tmp_path):
    mkdirs(tmp_path)
    async with replicas(kube, moto_sts, tls_dirs, tmp_path) as runs:
        async with agent_on(runs, moto_sts, tls_dirs) as agent:
            ip = add_pod(kube, "health", "app-health")
            await cached(agent, ip, "app-health")

            async def deep() -> tuple[int, str]:
                return await get(agent, "127.0.9.8", "/health?deep=1")

            async def says(status: int, text: str) -> bool:
                got = await deep()
                return got[0] == status and text in got[1]

            await eventually(lambda: says(200, "live"), timeout=15)
            await runs[0].server.stop(grace=0)
            await eventually(lambda: says(200, "one-stream"), timeout=10)
            await runs[1].server.stop(grace=0)
            await eventually(lambda: says(503, "stale"), timeout=10)
            metrics = await _metrics(agent)
            assert 'podiam_agent_mode{mode="stale"} 1.0' in metrics
            assert "podiam_agent_node_streams_live 0.0" in metrics


async def _metrics(agent) -> str:
    async with pod_session(NODE) as http:
        async with http.get(f"http://127.0.0.1:{agent.metrics_port}/metrics") as response:
            return await response.text()


# ---- merging two streams ------------------------------------------------------------------------


def snapshot(*pods: kiam_pb2.PodState) -> kiam_pb2.NodeUpdate:
    return kiam_pb2.NodeUpdate(reset=True, synced=True, pods=list(pods))


def pod(ip: str, role: str) -> kiam_pb2.PodState:
    return kiam_pb2.PodState(ip=ip, role=role, role_arn=BASE_ARN + role, identity="id-" + role)


def test_a_deletion_seen_by_either_stream_stops_the_answer():
    state = NodeState()
    first, second = state.view(), state.view()
    first.apply(snapshot(pod("10.0.0.1", "app-a")))
    second.apply(snapshot(pod("10.0.0.1", "app-a")))
    assert state.usable_entry("10.0.0.1").role == "app-a"
    # One replica has seen the pod deleted, the other not yet: the deletion wins.
    second.apply(kiam_pb2.NodeUpdate(removed_ips=["10.0.0.1"]))
    assert state.usable_entry("10.0.0.1") is None
    first.apply(kiam_pb2.NodeUpdate(removed_ips=["10.0.0.1"]))
    assert state.usable_entry("10.0.0.1") is None


def test_streams_that_disagree_about_an_ip_serve_neither_until_they_agree():
    state = NodeState()
    first, second = state.view(), state.view()
    first.apply(snapshot(pod("10.0.0.2", "app-old")))
    second.apply(snapshot(pod("10.0.0.2", "app-old")))
    # The IP went to a new pod; one stream has seen the deletion and the new pod, the other
    # still describes the old pod.
    first.apply(kiam_pb2.NodeUpdate(removed_ips=["10.0.0.2"], pods=[pod("10.0.0.2", "app-new")]))
    assert state.usable_entry("10.0.0.2") is None
    second.apply(kiam_pb2.NodeUpdate(removed_ips=["10.0.0.2"], pods=[pod("10.0.0.2", "app-new")]))
    assert state.usable_entry("10.0.0.2").role == "app-new"


def test_a_new_pod_is_served_as_soon_as_one_stream_brings_it():
    state = NodeState()
    first, second = state.view(), state.view()
    first.apply(snapshot())
    second.apply(snapshot())
    first.apply(kiam_pb2.NodeUpdate(pods=[pod("10.0.0.3", "app-new")]))
    assert state.usable_entry("10.0.0.3").role == "app-new"


def test_losing_one_stream_keeps_what_the_other_says():
    state = NodeState()
    first, second = state.view(), state.view()
    first.apply(snapshot(pod("10.0.0.4", "app-a")))
    second.apply(snapshot(pod("10.0.0.4", "app-a")))
    first.lost()
    assert state.mode is Mode.ONE_STREAM
    assert state.usable_entry("10.0.0.4").role == "app-a"
    second.apply(kiam_pb2.NodeUpdate(removed_ips=["10.0.0.4"]))
    assert state.usable_entry("10.0.0.4") is None


def test_without_a_stream_expired_credentials_are_never_served():
    now = [1_800_000_000.0]
    state = NodeState(wall=lambda: now[0], stale_grace=3600)
    view = state.view()
    creds = kiam_pb2.Credentials(
        access_key_id="AKIA", expiration="2027-01-15T08:30:00Z", last_updated="x"
    )
    update = snapshot(pod("10.0.0.5", "app-a"))
    update.credentials.add(identity="id-app-a", credentials=creds)
    view.apply(update)
    expires = 1_800_000_000.0 + 30 * 60  # 2027-01-15T08:30:00Z
    now[0] = expires - 40 * 60
    view.lost()
    assert state.mode is Mode.STALE
    assert state.usable_credentials("id-app-a") is not None
    now[0] = expires - 30
    assert state.usable_credentials("id-app-a") is None


class Routes:
    """Where each pod IP's host route points, as agent/hostroutes.py would report it."""

    def __init__(self) -> None:
        self.routes: dict[str, int] = {}

    def interface(self, ip: str) -> int | None:
        return self.routes.get(ip)

    def settle(self) -> None:
        """Nothing queued: the routes above are always current."""


def test_an_ip_whose_route_moved_stays_unserved_until_a_stream_speaks_of_it_again():
    routes = Routes()
    routes.routes["10.0.0.6"] = 7
    state = NodeState(routes=routes)
    first, second = state.view(), state.view()
    first.apply(snapshot(pod("10.0.0.6", "app-a")))
    second.apply(snapshot(pod("10.0.0.6", "app-a")))
    routes.routes["10.0.0.6"] = 9  # the IP now sits behind another pod's veth
    state.route_changed("10.0.0.6")
    assert state.usable_entry("10.0.0.6") is None
    # The other stream breaking (and the merge it causes) does not bring the entry back...
    second.lost()
    first.apply(kiam_pb2.NodeUpdate(pods=[pod("10.0.0.7", "app-b")]))
    assert state.usable_entry("10.0.0.6") is None
    # ...the stream describing the IP again does, with the new route as its evidence.
    first.apply(kiam_pb2.NodeUpdate(removed_ips=["10.0.0.6"], pods=[pod("10.0.0.6", "app-c")]))
    assert state.usable_entry("10.0.0.6").role == "app-c"
    routes.routes.pop("10.0.0.6")
    state.route_changed("10.0.0.6")
    assert state.usable_entry("10.0.0.6") is None
