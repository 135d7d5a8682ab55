"""The network-namespace test kit: it builds what the end-to-end tests assume, and leaves
nothing behind."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from tests.support.netns import (
    Cluster,
    demand,
    list_namespaces,
    requires_root,
    requires_tools,
    root_links,
    sweep,
)


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with Cluster() as cluster:
        yield cluster


@pytest.fixture
async def root_server() -> AsyncIterator[int]:
    """An HTTP server in pytest, listening on every address as the test API servers do; it
    answers with the caller's address. Yields its port."""

    async def whoami(request: web.Request) -> web.Response:
        return web.Response(text=request.remote or "")

    app = web.Application()
    app.router.add_get("/", whoami)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.create_server(("0.0.0.0", 0))
    try:
        await web.SockSite(runner, sock).start()
        yield sock.getsockname()[1]
    finally:
        await runner.cleanup()


def leftovers(cluster: Cluster) -> list[str]:
    names = [n for n in list_namespaces() if n.startswith(cluster.run_id)]
    links = [link for link in root_links() if link == cluster.root_interface]
    return names + links


def dead_pid() -> int:
    """The pid of a process that has just exited (as a crashed run's would be)."""
    child = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True, check=True)
    return int(child.stdout)


@requires_root
async def test_teardown_removes_every_namespace_link_and_process() -> None:
    cluster = Cluster().start()
    node = cluster.node("a")
    cluster.node("b").add_pod("app")
    pod = node.add_pod("app")
    sleeper = await pod.spawn("sleep", "600")
    assert len(cluster.namespaces) == 5
    assert cluster.root_interface in root_links()

    await cluster.aclose()

    assert leftovers(cluster) == []
    assert await asyncio.wait_for(sleeper.wait(), 5) is not None
    cluster.close()  # idempotent


@requires_root
async def test_teardown_happens_when_a_test_fails_midway() -> None:
    with pytest.raises(RuntimeError, match="midway"):
        async with Cluster() as cluster:
            cluster.node("a").add_pod("app")
            raise RuntimeError("midway")
    assert leftovers(cluster) == []


@requires_root
def test_sync_context_manager_tears_down_too() -> None:
    with Cluster() as cluster:
        cluster.node("a").add_pod("app")
        assert len(cluster.namespaces) == 3
    assert leftovers(cluster) == []


@requires_root
def test_sweep_removes_a_crashed_runs_leftovers_but_not_live_runs() -> None:
    prefix = "podiamsweeptest"
    crashed = f"{prefix}-{dead_pid()}-1"
    link = f"pdmswp{dead_pid() % 100000}"
    subprocess.run(["ip", "netns", "add", f"{crashed}-lan"], check=True)
    subprocess.run(
        [
            "ip",
            "link",
            "add",
            link,
            "type",
            "veth",
            "peer",
            "name",
            "root",
            "netns",
            f"{crashed}-lan",
        ],
        check=True,
    )
    subprocess.run(["ip", "link", "set", link, "alias", crashed], check=True)
    live = Cluster(prefix=prefix).start()
    try:
        live.node("a")
        # Starting a cluster sweeps its prefix: the crashed run is gone, this one stays.
        assert f"{crashed}-lan" not in list_namespaces()
        assert link not in root_links()
        assert sweep(prefix) == []
        assert f"{live.run_id}-a" in list_namespaces()
    finally:
        live.close()
        subprocess.run(["ip", "netns", "delete", f"{crashed}-lan"], capture_output=True)
        subprocess.run(["ip", "link", "delete", link], capture_output=True)


@requires_root
async def test_addresses_follow_the_documented_plan(cluster: Cluster) -> None:
    a, b = cluster.node("a"), cluster.node("b")
    pods = [a.add_pod("one"), a.add_pod("two"), b.add_pod("one")]
    lan = f"10.200.{cluster.lan}"
    assert (cluster.root_ip, a.ip, b.ip) == (f"{lan}.254", f"{lan}.1", f"{lan}.2")
    assert [p.ip for p in pods] == ["10.201.1.1", "10.201.1.2", "10.201.2.1"]
    assert all(p.host_interface.startswith("eni") and len(p.host_interface) == 14 for p in pods)
    assert a.read_sysctl("net.ipv4.ip_forward") == "1"
    assert cluster.node("a") is a


@requires_root
async def test_pod_reaches_its_node_and_nodes_reach_each_other(cluster: Cluster) -> None:
    a, b = cluster.node("a"), cluster.node("b")
    pod = a.add_pod("app")
    await a.serve_echo(a.ip, 8181, label="node-a")

    from_pod = await pod.fetch(f"http://{a.ip}:8181/p")
    assert from_pod.body == f"node-a {pod.ip} /p"
    from_b = await b.fetch(f"http://{a.ip}:8181/b")
    assert from_b.body == f"node-a {b.ip} /b"


@requires_root
async def test_metadata_address_answers_nobody_without_a_dnat_rule(cluster: Cluster) -> None:
    node = cluster.node("a")
    pod = node.add_pod("app")
    started = asyncio.get_running_loop().time()
    for ns in (pod, node):
        reply = await ns.fetch("http://169.254.169.254/latest/meta-data/", timeout=2)
        assert reply.status is None and reply.error
    # Unreachable, not a timeout: the node has no route and says so at once.
    assert asyncio.get_running_loop().time() - started < 3


@requires_root
async def test_root_namespace_and_nodes_reach_each_other(
    cluster: Cluster, root_server: int
) -> None:
    node = cluster.node("a")
    await node.serve_echo(node.ip, 8181, label="node-a")

    # pytest -> node
    timeout = aiohttp.ClientTimeout(total=3)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(f"http://{node.ip}:8181/from-root") as response:
            assert await response.text() == f"node-a {cluster.root_ip} /from-root"

    # node -> pytest
    reply = await node.fetch(f"http://{cluster.root_ip}:{root_server}/")
    assert (reply.status, reply.body) == (200, node.ip)


@requires_root
async def test_parallel_clusters_do_not_collide(root_server: int) -> None:
    async with Cluster() as one, Cluster() as two:
        assert one.run_id != two.run_id and one.root_interface != two.root_interface
        assert one.lan != two.lan
        for cluster in (one, two):
            node = cluster.node("a")
            await node.serve_echo(node.ip, 8181)
            assert (await node.fetch(f"http://{node.ip}:8181/")).status == 200
            # Each node reaches pytest at its own cluster's root address, over its own LAN.
            reply = await node.fetch(f"http://{cluster.root_ip}:{root_server}/")
            assert reply.body == node.ip
    assert leftovers(one) == [] and leftovers(two) == []


def test_missing_tools_skip_locally_but_fail_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="podiam-no-such-tool"):
        demand("podiam-no-such-tool")
    assert requires_tools("podiam-no-such-tool").args[0] is True

    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"CI=true but .*podiam-no-such-tool"):
        demand("podiam-no-such-tool")
    assert requires_tools("podiam-no-such-tool").args[0] is False
