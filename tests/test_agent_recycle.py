"""A server recycling its connections (``--max-connection-age``) is routine, not an outage.

The agent moves its node streams to new connections at the server's GOAWAY, before the old ones
are cut, so a new pod is answered from a stream throughout (the first test, a whole agent with
one server replica and with two; with two, the streams still follow two different replicas).
An agent with no live node stream at such a moment must still answer a new pod through the
unary path, not refuse it as if no server were reachable (issue 9): the second test's lookup has
no stream at all, so every answer goes through the unary RPCs over the shared channel, across
many real recycles of real mutual-TLS gRPC connections. The partition and server-down refusals
neither may weaken are shown in tests/test_agent_stable.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import grpc
import pytest

from agent.client import ServerClient, ServerConnection
from agent.lookup import PodLookup
from agent.refusal import Refused
from agent.state import NodeState
from tests.support.agent import NODE, pod_session, running_agent
from tests.support.pods import add_pod
from tests.support.scrape import unlabelled_value
from tests.support.server import indexed, running_server
from tests.support.waiting import eventually

RECYCLES = 4
HANDOVERS = 3
CREDS = "/latest/meta-data/iam/security-credentials/"


@pytest.fixture(scope="module")
def namespaces():
    return {"apps": "app-.*"}


async def _counter(agent, name: str) -> float:
    async with pod_session("127.0.0.1") as http:
        async with http.get(f"http://127.0.0.1:{agent.metrics_port}/metrics") as response:
            return unlabelled_value(await response.text(), name)


# Each connection is recycled a second after it opens and cut a second after its GOAWAY: a
# stream that only reconnected once cut would leave its node without it every 2 s or so.
RECYCLING = ["--max-connection-age", "1s", "--max-connection-age-grace", "1s"]


@contextlib.asynccontextmanager
async def _replicas(kube, moto_sts, tls_dirs, tmp_path, count: int):
    async with contextlib.AsyncExitStack() as stack:
        runs = []
        for n in range(count):
            (tmp_path / f"r{n}").mkdir()
            runs.append(
                await stack.enter_async_context(
                    running_server(kube, moto_sts, tls_dirs, tmp_path / f"r{n}", extra=RECYCLING)
                )
            )
        yield runs


@pytest.mark.parametrize("replicas", [1, 2], ids=["one-replica", "two-replicas"])
async def test_a_new_pod_is_answered_from_the_stream_while_the_server_recycles_its_connection(
    kube, moto_sts, tls_dirs, tmp_path, replicas
):
    async with _replicas(kube, moto_sts, tls_dirs, tmp_path, replicas) as runs:
        address = ",".join(f"127.0.0.1:{run.server.port}" for run in runs)
        async with running_agent(
            server_port=runs[0].server.port,
            tls=tls_dirs,
            metadata=moto_sts.endpoint_url,
            extra=["--server-address", address],
        ) as agent:
            await asyncio.wait_for(agent.streams.synced_once.wait(), 15)
            followers = agent.streams.followers
            if replicas == 2:
                await eventually(lambda: all(f.live for f in followers), timeout=15)
            lost = await _counter(agent, "podiam_agent_node_stream_reconnects_total")
            moved = await _counter(agent, "podiam_agent_node_stream_handovers_total")
            statuses: list[int] = []
            without_stream = [0]
            on_one_replica = [0]  # moments both streams followed the same replica
            done = asyncio.Event()

            async def watch_streams() -> None:
                while not done.is_set():
                    without_stream[0] += not agent.state.live
                    followed = [f.endpoint for f in followers if f.endpoint is not None]
                    on_one_replica[0] += len(followed) != len(set(followed))
                    await asyncio.sleep(0.001)

            async def new_pods() -> None:
                # Until the streams have been moved a few times, or one was lost after all.
                for n in itertools.count():
                    handed = await _counter(agent, "podiam_agent_node_stream_handovers_total")
                    ended = await _counter(agent, "podiam_agent_node_stream_reconnects_total")
                    if handed - moved >= HANDOVERS * replicas or ended > lost:
                        return
                    name = f"handed-{replicas}-{n}"
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
                moved + HANDOVERS * replicas
            )
            assert on_one_replica[0] == 0
            if replicas == 2:
                assert all(f.live for f in followers)


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
