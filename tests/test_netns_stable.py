"""Route evidence with real veths: the agent in a node namespace, behind its real DNAT rule,
watches the /32 host routes the CNI gives each pod (``eni…`` here, as the AWS VPC CNI names
them) and stops serving a pod's cached credentials the moment its route goes or moves.

The agents run with ``--stale-grace 0s``: whatever is served from memory without a server is
vouched for by a route, never by time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest_asyncio

from tests.support.e2e import AGENT_METRICS_PORT, PodiamCluster, PodiamPod
from tests.support.netns import requires_tools

pytestmark = requires_tools("ip", "iptables")

CREDS = "/latest/meta-data/iam/security-credentials/"


@pytest_asyncio.fixture(scope="module")
async def podiam() -> AsyncIterator[PodiamCluster]:
    async with PodiamCluster(
        workers=1,
        permitted={"apps": "app-.*"},
        agent_args=["--stale-grace", "0s", "--pod-wait", "5s"],
    ) as podiam:
        yield podiam


def impostor(podiam: PodiamCluster, old: PodiamPod, name: str) -> PodiamPod:
    """A new pod at ``old``'s IP behind a new veth; Kubernetes is not told (yet)."""
    netns = old.node.replace_pod(old.netns, name)
    assert netns.ip == old.ip
    return PodiamPod(netns, "apps", name, None, podiam)


async def served_from_memory(podiam: PodiamCluster, pod: PodiamPod, role: str) -> None:
    """Ask until the answer no longer needs the server (its credentials came on the stream)."""
    for _ in range(10):
        got = await pod.fetch(CREDS + role)
        assert got.status == 200, (got, podiam.logs())
        await asyncio.sleep(0.1)


async def test_route_moving_to_another_interface_is_not_served_until_stream_confirms(
    podiam: PodiamCluster,
) -> None:
    old = podiam.add_pod(0, "apps", "mover-old", "app-mover-old")
    await served_from_memory(podiam, old, "app-mover-old")
    # The IP moves to a new pod's veth before the server has heard of the change: the agent
    # must not answer from what the stream said about the IP's previous holder...
    new = impostor(podiam, old, "mover-new")
    asked = asyncio.create_task(new.fetch(CREDS, timeout=10))
    await asyncio.sleep(0.5)
    assert not asked.done(), asked.result()
    # ...but wait until the stream confirms who holds the IP now.
    podiam.delete_pod(old)
    podiam.add_pod(0, "apps", "mover-new", "app-mover-new", reuse=new)
    got = await asked
    assert (got.status, got.body) == (200, "app-mover-new"), (got, podiam.logs())
    assert (await new.fetch(CREDS + "app-mover-old")).status == 404


async def test_deleted_pods_route_disappearing_stops_stale_service_at_once(
    podiam: PodiamCluster,
) -> None:
    kept = podiam.add_pod(0, "apps", "kept", "app-kept")
    gone = podiam.add_pod(0, "apps", "gone", "app-gone")
    for pod in (kept, gone):
        await served_from_memory(podiam, pod, pod.role)
    assert podiam.server is not None
    await podiam.server.kill()
    try:
        # No server and no grace: only the unchanged host routes vouch for these IPs.
        for pod in (kept, gone):
            got = await pod.fetch(CREDS + pod.role)
            assert got.status == 200, (got, podiam.logs())
        health = await kept.fetch("/health?deep=1")
        assert health.status == 503 and "stale" in health.body, health
        # The pod goes and its IP is handed on during the outage: the new holder never gets
        # the old pod's credentials, and is refused at once, with the reason.
        thief = impostor(podiam, gone, "thief")
        for path in (CREDS, CREDS + "app-gone"):
            got = await thief.fetch(path)
            assert got.status == 503, (got, podiam.logs())
            assert "no podiam server is reachable" in got.body, got
        assert (await kept.fetch(CREDS + "app-kept")).status == 200
    finally:
        await podiam.server.start()
    # Once the server is back and has heard of the new holder, it gets its own role.
    podiam.delete_pod(gone)
    thief = podiam.add_pod(0, "apps", "thief", "app-thief", reuse=thief)
    for _ in range(50):
        got = await thief.fetch(CREDS)
        if got.status == 200:
            break
        await asyncio.sleep(0.1)
    assert (got.status, got.body) == (200, "app-thief"), (got, podiam.logs())


# ---- two replicas ------------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module")
async def pair() -> AsyncIterator[PodiamCluster]:
    async with PodiamCluster(workers=1, servers=2, permitted={"apps": "app-.*"}) as podiam:
        yield podiam


async def streams_live(podiam: PodiamCluster, pod: PodiamPod) -> str:
    node = pod.node
    got = await pod.netns.fetch(f"http://{node.ip}:{AGENT_METRICS_PORT}/metrics")
    line = next(x for x in got.body.splitlines() if x.startswith("podiam_agent_node_streams_live"))
    return line.split()[-1]


async def test_sigkill_of_one_of_two_replicas_fails_no_pods_request(pair: PodiamCluster) -> None:
    pods = [pair.add_pod(0, "apps", f"steady-{n}", f"app-steady-{n}") for n in range(2)]
    for pod in pods:
        await served_from_memory(pair, pod, pod.role)
    for _ in range(100):
        if await streams_live(pair, pods[0]) == "2.0":
            break
        await asyncio.sleep(0.1)
    assert await streams_live(pair, pods[0]) == "2.0", pair.logs()
    assert pair.sts is not None
    assumed = pair.sts.assume_role_calls()
    load = [asyncio.create_task(pod.hammer(CREDS + pod.role, 4.0)) for pod in pods]
    await asyncio.sleep(1.5)
    victim = pair.servers[1]
    await victim.kill()
    try:
        results = await asyncio.gather(*load)
        for counts, _slowest in results:
            assert set(counts) == {"200"}, (counts, pair.logs())
            print("requests during the kill:", counts)
            assert counts["200"] > 50  # the load ran throughout
        assert pair.sts.assume_role_calls() == assumed
        assert await streams_live(pair, pods[0]) == "1.0"
    finally:
        await victim.start()
