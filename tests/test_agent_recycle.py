"""A server recycling its connections (``--max-connection-age``) is routine, not an outage: an
agent with no live node stream at that moment must still answer a new pod through the unary
path, not refuse it as if no server were reachable (issue 9).

The lookup here has no stream at all, so every answer goes through the unary RPCs over the
shared channel, across many real recycles of real mutual-TLS gRPC connections. The partition
and server-down refusals it must not weaken are shown in tests/test_agent_stable.py.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from agent.client import ServerClient, ServerConnection
from agent.lookup import PodLookup
from agent.refusal import Refused
from agent.state import NodeState
from tests.support.pods import add_pod
from tests.support.server import indexed, running_server

RECYCLES = 4


@pytest.fixture(scope="module")
def namespaces():
    return {"apps": "app-.*"}


async def _count_recycles(channel: grpc.aio.Channel, recycles: list[int]) -> None:
    state = channel.get_state()
    while True:
        await channel.wait_for_state_change(state)
        if state is grpc.ChannelConnectivity.READY:
            recycles[0] += 1  # the connection went away and the channel reconnects
        state = channel.get_state()


async def test_a_new_pod_is_answered_while_the_server_recycles_its_connections(
    kube, moto_sts, tls_dirs, tmp_path
):
    flags = ["--max-connection-age", "1s"]
    async with running_server(kube, moto_sts, tls_dirs, tmp_path, extra=flags) as run:
        ip = add_pod(kube, "apps", "recycled", "app-recycled")
        await indexed(run, ip)
        connection = ServerConnection(f"127.0.0.1:{run.server.port}", tls_dirs.agent)
        synced = asyncio.Event()
        synced.set()  # the agent was connected once; no stream is live now
        lookup = PodLookup(NodeState(), ServerClient(connection), pod_wait=1.0, synced_once=synced)
        recycles = [0]
        answers: list[str] = []
        refusals: list[tuple[int, str]] = []

        async def ask() -> None:
            while recycles[0] < RECYCLES:
                try:
                    answers.append((await lookup.entry(ip)).role_name)
                except Refused as refused:
                    refusals.append((refused.status, refused.reason))
                await asyncio.sleep(0.005)

        # The channel starts IDLE, as the agent's shared channel is while its streams answer:
        # the first questions find it opening its connection, like those after a recycle.
        watcher = asyncio.create_task(connection.watch_state())
        counter = asyncio.create_task(_count_recycles(connection.channel, recycles))
        try:
            await asyncio.wait_for(asyncio.gather(*(ask() for _ in range(4))), 120)
        finally:
            for task in (watcher, counter):
                task.cancel()
            await asyncio.gather(watcher, counter, return_exceptions=True)
            await connection.close()
        assert recycles[0] >= RECYCLES
        assert refusals == []
        assert answers and set(answers) == {"app-recycled"}
