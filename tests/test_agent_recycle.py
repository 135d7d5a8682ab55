"""A server recycling its connections (``--max-connection-age``) is routine, not an outage.

The agent moves its node stream to a new connection at the server's GOAWAY, before the old one
is cut, so a new pod is answered from the stream throughout (the first test, a whole agent).
An agent with no live node stream at such a moment must still answer a new pod through the
unary path, not refuse it as if no server were reachable (issue 9): the second test's lookup has
no stream at all, so every answer goes through the unary RPCs over the shared channel, across
many real recycles of real mutual-TLS gRPC connections. The partition and server-down refusals
neither may weaken are shown in tests/test_agent_stable.py.
"""

from __future__ import annotations

import asyncio
import itertools

import grpc
import pytest

from agent.client import ServerClient, ServerConnection
from agent.lookup import PodLookup
from agent.refusal import Refused
from agent.state import NodeState
from tests.support.agent import NODE, pod_session, running_agent
from tests.support.pods import add_pod
from tests.support.server import indexed, running_server

RECYCLES = 4
HANDOVERS = 3
CREDS = "/latest/meta-data/iam/security-credentials/"


@pytest.fixture(scope="module")
def namespaces():
    return {"apps": "app-.*"}


async def _counter(agent, name: str) -> float:
    async with pod_session("127.0.0.1") as http:
        async with http.get(f"http://127.0.0.1:{agent.metrics_port}/metrics") as response:
            text = await response.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def test_a_new_pod_is_answered_from_the_stream_while_the_server_recycles_its_connection(
    kube, moto_sts, tls_dirs, tmp_path
):
    # Each connection is recycled a second after it opens and cut a second after its GOAWAY:
    # a stream that only reconnected once cut would leave the node without one every 2 s.
    flags = ["--max-connection-age", "1s", "--max-connection-age-grace", "1s"]
    async with running_server(kube, moto_sts, tls_dirs, tmp_path, extra=flags) as run:
        async with running_agent(
            server_port=run.server.port, tls=tls_dirs, metadata=moto_sts.endpoint_url
        ) as agent:
            await asyncio.wait_for(agent.streams.synced_once.wait(), 15)
            lost = await _counter(agent, "podiam_agent_node_stream_reconnects_total")
            moved = await _counter(agent, "podiam_agent_node_stream_handovers_total")
            statuses: list[int] = []
            without_stream = [0]
            done = asyncio.Event()

            async def watch_streams() -> None:
                while not done.is_set():
                    without_stream[0] += not agent.state.live
                    await asyncio.sleep(0.001)

            async def new_pods() -> None:
                # Until the stream has been moved a few times, or was lost after all.
                for n in itertools.count():
                    handed = await _counter(agent, "podiam_agent_node_stream_handovers_total")
                    ended = await _counter(agent, "podiam_agent_node_stream_reconnects_total")
                    if handed - moved >= HANDOVERS or ended > lost:
                        return
                    name = f"handed-{n}"
                    ip = add_pod(kube, "apps", name, f"app-{name}")
                    async with pod_session(ip) as http:
                        url = f"http://{NODE}:{agent.port}{CREDS}app-{name}"
                        async with http.get(url) as response:
                            await response.read()
                            statuses.append(response.status)
                    await asyncio.sleep(0.1)

            watcher = asyncio.create_task(watch_streams())
            try:
                await asyncio.wait_for(new_pods(), 120)
            finally:
                done.set()
                await watcher
            assert await _counter(agent, "podiam_agent_node_stream_reconnects_total") == lost
            assert without_stream[0] == 0
            assert statuses and set(statuses) == {200}, statuses
            assert await _counter(agent, "podiam_agent_node_stream_handovers_total") >= (
                moved + HANDOVERS
            )


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
