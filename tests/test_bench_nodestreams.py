"""The scale bench's simulated agents (bench/nodestreams.py) keep their node streams as the real
agent does: a server recycling its connections (--max-connection-age) moves every stream to a
new connection without losing it, and a server restart loses each stream once and reconnects it,
so a bench run of any length measures all of its nodes. Real podiam servers, real mutual TLS,
the simulated agents in their own process. And bench/ping_storm.py's reading of gRPC's ping
trace, which says whose side a timed-out keepalive ping waited on."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from contextlib import asynccontextmanager

from bench.ping_storm import trace_pings
from bench.procs import REPO, env, free_port
from bench.server_scale import by_phase
from tests.support.server import running_server
from tests.support.waiting import eventually

HOSTS = ["10.9.0.1", "10.9.0.2", "10.9.0.3"]
# Each connection recycled a second after it opens and cut a second after its GOAWAY: a stream
# that only reconnected once cut would be lost every 2 s or so.
RECYCLING = ["--max-connection-age", "1s", "--max-connection-age-grace", "1s"]


class _Agents:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def answer(self, command: str, prefix: str) -> dict:
        self.process.stdin.write(command.encode() + b"\n")
        await self.process.stdin.drain()
        line = (await asyncio.wait_for(self.process.stdout.readline(), 30)).decode()
        assert line.startswith(prefix), line
        return json.loads(line[len(prefix) :])

    async def status(self) -> dict:
        return await self.answer("status", "status ")


@asynccontextmanager
async def _simulated_agents(port: int, tls):
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.nodestreams",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=REPO, env=env(),
    )  # fmt: skip
    agents = _Agents(process)
    try:
        spec = {"target": f"localhost:{port}", "tls": str(tls.good), "hosts": HOSTS}
        process.stdin.write(json.dumps(spec).encode() + b"\n")
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        assert line.startswith("ready "), line
        ready = json.loads(line[len("ready ") :])
        assert ready["failed"] == 0, ready
        yield agents
    finally:
        if process.returncode is None:
            process.stdin.write(b"quit\n")
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


async def test_simulated_agents_follow_a_server_recycling_its_connections_without_a_loss(
    kube, moto_sts, tls_dirs, tmp_path
):
    extra = ["--no-node-binding", *RECYCLING]
    async with running_server(kube, moto_sts, tls_dirs, tmp_path, extra=extra) as run:
        async with _simulated_agents(run.server.port, tls_dirs) as agents:
            moved = {}

            async def moved_twice_each() -> bool:
                moved.update(await agents.status())
                return moved["moves"] >= 2 * len(HOSTS)

            await eventually(moved_twice_each, timeout=30, interval=0.2)
            status = await agents.status()
    assert status["dropped"] == 0, status
    assert status["live"] == len(HOSTS)


async def test_simulated_agents_reconnect_after_a_server_restart_and_count_each_loss(
    kube, moto_sts, tls_dirs, tmp_path
):
    port = free_port()
    extra = ["--no-node-binding", "--bind", f"127.0.0.1:{port}"]
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    async with contextlib.AsyncExitStack() as stack:
        async with running_server(kube, moto_sts, tls_dirs, tmp_path / "first", extra=extra):
            agents = await stack.enter_async_context(_simulated_agents(port, tls_dirs))
            assert (await agents.status())["live"] == len(HOSTS)
        lost = {}

        async def every_stream_lost() -> bool:
            lost.update(await agents.status())
            return lost["live"] == 0

        await eventually(every_stream_lost, timeout=30, interval=0.2)
        async with running_server(kube, moto_sts, tls_dirs, tmp_path / "second", extra=extra):
            back = {}

            async def every_stream_back() -> bool:
                back.update(await agents.status())
                return back["live"] == len(HOSTS)

            await eventually(every_stream_back, timeout=30, interval=0.2)
    # One loss per stream, each reconnected; a restart is no recycle.
    assert back["dropped"] == len(HOSTS), back
    assert back["moves"] == 0


def test_ping_trace_tells_a_late_server_read_from_a_late_agent_read(tmp_path):
    # gRPC's own trace lines (GRPC_TRACE=http2_ping,http_keepalive), two pings never answered
    # in time: the server reads the first 2.5 s after the agent wrote it (the server's lateness);
    # it reads and answers the second at once, and the agent never reads that answer (the
    # agent's). A third, sent at the end of the run, is not judged.
    agent = tmp_path / "agents0.log"
    server = tmp_path / "server.log"
    agent.write_text(
        "I1202 06:00:00.000000 1 writing.cc:144] CLIENT[0xa]: Ping 11 sent [x]: more\n"
        "I1202 06:00:00.001000 1 chttp2_transport.cc:1319] CLIENT[0xa]: Finish write\n"
        "I1202 06:00:10.000000 1 writing.cc:144] CLIENT[0xb]: Ping 22 sent [x]: more\n"
        "I1202 06:00:10.001000 1 chttp2_transport.cc:1319] CLIENT[0xb]: Finish write\n"
        "I1202 06:00:20.000000 1 writing.cc:144] CLIENT[0xc]: Ping 33 sent [x]: more\n"
    )
    server.write_text(
        "I1202 06:00:02.501000 2 frame_ping.cc:106] SERVER[0x1]: received ping 11: now=@1ms\n"
        "I1202 06:00:02.502000 2 chttp2_transport.cc:1304] SERVER[0x1]: Write 17 bytes\n"
        "I1202 06:00:10.002000 2 frame_ping.cc:106] SERVER[0x2]: received ping 22: now=@1ms\n"
        "I1202 06:00:10.003000 2 chttp2_transport.cc:1304] SERVER[0x2]: Write 17 bytes\n"
    )
    pings = trace_pings([server, agent])
    assert pings["pings"] == 3 and pings["timed out"] == 2
    assert pings["server: written to read"]["timed out, s"] == [0.001, 2.5]
    assert pings["server: read to ACK written"]["timed out, s"] == [0.001, 0.001]
    # Neither answer was read by the agent (it closed the connection at its timeout).
    assert pings["agent: ACK written to read"]["timed out, s"] == []


def test_scale_bench_places_each_lost_stream_in_the_phase_it_was_lost_in():
    phases = [("connect storm", 100.0), ("connected", 130.0), ("watch burst", 200.0)]
    lost_at = [101.0, 129.9, 130.0, 250.0]
    assert by_phase(phases, lost_at) == {"connect storm": 2, "connected": 1, "watch burst": 1}
