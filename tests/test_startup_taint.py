"""New nodes: the startup taint comes off only when the node's own agent intercepts metadata.

A real server over real mutual-TLS gRPC, the Kubernetes API test server holding the nodes, and
either a real agent, the agent's own follower and reporter with a real DNAT rule in a network
namespace, or a bare gRPC client speaking for an agent that claims to be ready (the server must
still check that the node is the caller's).
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from agent.client import ServerClient, ServerConnection, StreamFollower
from agent.iptables import MetadataRedirect
from agent.readiness import ReadinessReporter
from agent.state import NodeState
from protos import kiam_pb2
from server.config import parse_config
from tests.support.agent import running_agent
from tests.support.kubeapi import KubeApiServer
from tests.support.netns import Cluster, Node, requires_root
from tests.support.server import running_server, server_argv
from tests.support.waiting import eventually

KEY = "podiam.io/agent-not-ready"
STARTUP = {"key": KEY, "value": "true", "effect": "NoExecute"}
OTHER = {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}
CLOUD = {"key": "node.cloudprovider.kubernetes.io/uninitialized", "value": "true",
         "effect": "NoSchedule"}  # fmt: skip
CALLER = "127.0.0.1"  # test clients and in-process agents connect from here
_names = (f"node-{n}" for n in itertools.count(1))


@pytest.fixture(scope="module")
def namespaces():
    return {"default": None}  # where Events about nodes go


def new_node(kube: KubeApiServer, *, ip: str = CALLER, taints=(STARTUP,)) -> str:
    name = next(_names)
    kube.add_node(name, internal_ip=ip, taints=taints)
    return name


def ready(node: str, **fields) -> kiam_pb2.NodeReadyReport:
    report = {"node_name": node, "host_ip": CALLER, "redirect_installed": True}
    return kiam_pb2.NodeReadyReport(**{**report, "snapshot_applied": True, **fields})


def removals(outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "podiam_startup_taint_removals_total", {"outcome": outcome}
    )  # fmt: skip
    return value or 0.0


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    return error.value


def node_events(kube: KubeApiServer, node: str) -> list[dict]:
    return [
        event
        for event in kube.events
        if event["involvedObject"].get("kind") == "Node" and event["involvedObject"]["name"] == node
    ]


# ---- what the agent must have done first ----------------------------------------------------


@requires_root
async def test_taint_disappears_only_after_the_agents_rule_is_installed(
    podiam, kube, tls_dirs, tmp_path: Path
):
    # The agent's own follower and reporter; its DNAT rule lives in a node namespace, managed
    # with real iptables there through a shim (see tests/test_iptables.py).
    async with Cluster() as cluster:
        netns = cluster.node("worker")
        redirect = MetadataRedirect(host=netns.ip, port=8181, iptables=shim(tmp_path, netns))
        name = new_node(kube)
        connection = ServerConnection(f"localhost:{podiam.server.port}", tls_dirs.agent)
        reporter = ReadinessReporter(
            lambda: connection.stub, node_name=name, host_ip=CALLER, redirect=redirect
        )
        follower = StreamFollower(
            ServerClient(connection), NodeState(), host_ip=CALLER, server="test",
            rotated=connection.rotated, on_synced=reporter.synced,
        )  # fmt: skip
        following = asyncio.create_task(follower.run())
        try:
            # Synced, reported, refused: the rule is not there yet.
            await asyncio.wait_for(reporter.answered.wait(), 15)
            assert reporter.last_answer == "FAILED_PRECONDITION"
            assert kube.taints(name) == [STARTUP]

            await redirect.install()
            reporter.answered.clear()
            connection.rotated.set()  # the stream is followed anew, as after a reconnect
            await asyncio.wait_for(reporter.answered.wait(), 15)
            assert reporter.last_answer == "scheduled"
            await eventually(lambda: kube.taints(name) == [])
            assert await redirect.present()
        finally:
            following.cancel()
            await asyncio.gather(following, return_exceptions=True)
            await reporter.close()
            await connection.close()


def shim(tmp_path: Path, node: Node) -> str:
    path = tmp_path / f"iptables-in-{node.name}"
    path.write_text(f'#!/bin/sh\nexec ip netns exec {node.name} iptables "$@"\n')
    path.chmod(0o755)
    return str(path)


async def test_agent_without_its_rule_never_clears_the_taint(podiam, kube, tls_dirs, moto_sts):
    name = new_node(kube)
    patches = kube.node_requests["PATCH"]
    async with running_agent(
        server_port=podiam.server.port, tls=tls_dirs, metadata=moto_sts.endpoint_url,
        extra=["--node-name", name],  # and no --iptables: nothing intercepts metadata here
    ) as agent:  # fmt: skip
        await asyncio.wait_for(agent.reporter.answered.wait(), 15)
        assert agent.follower.synced_once.is_set()
        assert agent.reporter.last_answer == "FAILED_PRECONDITION"
    assert kube.taints(name) == [STARTUP]
    assert kube.node_requests["PATCH"] == patches


async def test_report_without_an_applied_snapshot_keeps_the_taint(podiam, kube, stub):
    name = new_node(kube)
    error = await refused(stub.ReportNodeReady(ready(name, snapshot_applied=False)))
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "snapshot" in error.details()
    assert kube.taints(name) == [STARTUP]


# ---- what the server removes, and for whom ---------------------------------------------------


async def test_other_taints_are_untouched(podiam, kube, stub):
    also_startup = {"key": KEY, "effect": "NoSchedule"}  # same key, other effect, no value
    name = new_node(kube, taints=[CLOUD, STARTUP, OTHER, also_startup])
    answer = await stub.ReportNodeReady(ready(name))
    assert answer.outcome == "scheduled"
    await eventually(lambda: kube.taints(name) == [CLOUD, OTHER])


async def test_agent_cannot_clear_another_nodes_taint(podiam, kube, stub):
    far = new_node(kube, ip="10.99.0.1")
    patches = kube.node_requests["PATCH"]
    error = await refused(stub.ReportNodeReady(ready(far, host_ip="10.99.0.1")))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert CALLER in error.details()
    assert kube.taints(far) == [STARTUP]
    assert kube.node_requests["PATCH"] == patches


async def test_report_for_a_node_that_does_not_exist_is_not_found(stub):
    error = await refused(stub.ReportNodeReady(ready("no-such-node")))
    assert error.code() is grpc.StatusCode.NOT_FOUND


async def test_removal_is_idempotent_and_records_an_event_on_the_node(podiam, kube, stub):
    name = new_node(kube, taints=[STARTUP, OTHER])
    absent = removals("absent")
    patches = kube.node_requests["PATCH"]
    assert (await stub.ReportNodeReady(ready(name))).outcome == "scheduled"
    await podiam.server.startup_taint.drain()
    assert kube.taints(name) == [OTHER]
    # Reconnects report again: nothing to do, and nothing written.
    for _ in range(2):
        assert (await stub.ReportNodeReady(ready(name))).outcome == "absent"
    assert kube.node_requests["PATCH"] == patches + 1
    assert removals("absent") == absent + 2
    node = kube.node(name)
    await eventually(lambda: node_events(kube, name))
    [event] = node_events(kube, name)
    assert event["metadata"]["namespace"] == "default"
    assert event["involvedObject"] == {
        "apiVersion": "v1", "kind": "Node", "name": name, "uid": node["metadata"]["uid"],
    }  # fmt: skip
    assert (event["type"], event["reason"]) == ("Normal", "PodiamAgentReady")
    assert KEY in event["message"]


async def test_server_retries_after_api_errors(podiam, kube, stub):
    name = new_node(kube)
    errors, removed = removals("error"), removals("removed")
    kube.fail_next("PATCH", "nodes", 500, times=2)
    answer = await stub.ReportNodeReady(ready(name))
    assert answer.outcome == "scheduled"  # answered before the API server has been persuaded
    await eventually(lambda: kube.taints(name) == [], timeout=10)
    assert removals("error") == errors + 2
    assert removals("removed") == removed + 1


async def test_api_unavailable_when_reading_the_node_is_unavailable_to_the_agent(
    podiam, kube, stub
):
    name = new_node(kube)
    kube.fail_next("GET", "nodes", 503)
    error = await refused(stub.ReportNodeReady(ready(name)))
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert kube.taints(name) == [STARTUP]
    assert (await stub.ReportNodeReady(ready(name))).outcome == "scheduled"
    await podiam.server.startup_taint.drain()
    assert kube.taints(name) == []


async def test_taint_changed_concurrently_by_another_controller_is_not_clobbered(
    podiam, kube, stub
):
    name = new_node(kube, taints=[CLOUD, STARTUP])
    conflicts = removals("conflict")
    # The cloud controller initialises the node between the server's read and its patch.
    kube.before_node_patch(name, lambda kube: kube.set_taints(name, [STARTUP, OTHER]))
    assert (await stub.ReportNodeReady(ready(name))).outcome == "scheduled"
    await podiam.server.startup_taint.drain()
    assert kube.taints(name) == [OTHER]
    assert removals("conflict") == conflicts + 1


# ---- configuration ---------------------------------------------------------------------------


async def test_server_with_the_startup_taint_disabled_leaves_nodes_alone(
    kube, moto_sts, tls_dirs, tmp_path
):
    name = new_node(kube)
    async with running_server(
        kube, moto_sts, tls_dirs, tmp_path, extra=["--startup-taint", ""]
    ) as run:
        async with run.channel() as channel:
            answer = await run.stub(channel).ReportNodeReady(ready(name))
    assert answer.outcome == "disabled"
    assert kube.taints(name) == [STARTUP]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, KEY),
        ("example.com/not-ready", "example.com/not-ready"),
        ("plain", "plain"),
        ("", None),
        ("  ", None),
    ],
)
def test_startup_taint_flag_and_its_environment_twin(tls_dirs, tmp_path, value, expected):
    argv = server_argv(kubeconfig=tmp_path / "k", sts=_NoSts(), tls=tls_dirs)
    from_flag = parse_config(
        [*argv, "--startup-taint", value] if value is not None else argv, environ={}
    )
    assert from_flag.startup_taint == expected
    environ = {"PODIAM_STARTUP_TAINT": value} if value is not None else {}
    assert parse_config(argv, environ=environ).startup_taint == expected


@pytest.mark.parametrize("value", ["bad key", "Example.com/x", "/x", "x/", "a/b/c", "-x"])
def test_startup_taint_that_is_not_a_taint_key_is_refused(tls_dirs, tmp_path, capsys, value):
    argv = server_argv(kubeconfig=tmp_path / "k", sts=_NoSts(), tls=tls_dirs)
    with pytest.raises(SystemExit):
        parse_config([*argv, "--startup-taint", value], environ={})
    assert "--startup-taint" in capsys.readouterr().err


class _NoSts:
    endpoint_url = "http://127.0.0.1:1"
