"""Simulated agents: one WatchNode stream per node, each over a channel (a TCP connection) of its
own with the real agent's channel options (keepalive pings every 5 s), as real agents hold them
(the server runs with --no-node-binding, so one process may stand
in for many nodes; the bench spreads the nodes over a few such processes). Each stream is kept
as the agent keeps its own (agent/client.py StreamFollower): at the server's GOAWAY (its
--max-connection-age) a second stream is opened on a new connection and takes over once synced,
the old one closed after the agent's overlap (a move); a stream that ends otherwise is lost and
reconnected with the agent's backoff (a loss), so a run of any length keeps every node.

    python -m bench.nodestreams        # a JSON spec on stdin's first line, then commands

Spec: ``{"target", "tls", "hosts": [host_ip, ...], "channels", "cpu"}`` (``channels``: how many
connections the streams share, one per host when absent). Prints ``ready {"seconds", "failed",
"first_failures", "retries", "retry_causes"}`` once every stream has its snapshot or has ended
(a stream whose call fails before its first snapshot is tried again, with the agent's backoff,
for up to ``CONNECT_FOR`` seconds: ``retries`` counts those failed tries, by status; ``failed``,
the streams that never had one), then takes commands, one a line:

    watch <first> <count> <nodes>   pods first..first+count-1 of bench/kubeproc.py are about
                                    to be added: print ``watching``, wait until each has
                                    reached its own node's stream, and print ``watched
                                    {"seconds", "delivered", "misrouted", "updates",
                                    "latencies", "dropped", "dropped_causes"}`` — misrouted
                                    counts pod states that reached another node's stream
                                    (there must be none); latencies, the seconds from the
                                    command to each pod's arrival (a pod may arrive in the
                                    snapshot of a stream reconnected meanwhile); and the
                                    fields of ``status``
    refresh <seconds> <path>        note which credentials each stream holds now, and wait up to
                                    <seconds> until every stream has been sent new credentials
                                    for each identity it held; write to <path> ``{host: [[
                                    access_key_id, arrival], ...]}`` (arrival: time.time() when
                                    the new set reached the stream) and print ``refreshed
                                    {"streams", "waiting"}`` — waiting: the streams still
                                    missing some when the time ran out (and the fields of
                                    ``status``)
    lifecycle <old> <new> <count> <nodes> <path> [<seconds>]
                                    pods new..new+count-1 are about to replace pods
                                    old..old+count-1 (bench/kubeproc.py ``rollout``): print
                                    ``following``, wait until each new pod's state and each
                                    old pod's removal has reached its own node's stream (or
                                    <seconds>, 600 if not given, have passed), write
                                    to <path> ``{ip: arrival}`` (time.time()), and print
                                    ``followed {"seconds", "states", "removals", "misrouted",
                                    "updates", "missing", "lost"}`` (misrouted: a state or
                                    removal of one of them on another node's stream; lost:
                                    those of streams that ended meanwhile, no longer awaited;
                                    updates: the stream messages meanwhile) and
                                    the fields of ``status``
    status                          print ``status {"dropped", "dropped_causes", "dropped_at",
                                    "moves", "live", "reconnect_retries"}``: the losses since
                                    the start (streams that ended after a snapshot, each
                                    reconnected), by gRPC status and details ("too_many_pings"
                                    would be the server's keepalive enforcement refusing the
                                    agent's pings) and when (``[time.time(), cause]``), the
                                    moves at a GOAWAY, the streams live now, and reconnect
                                    tries that failed before their snapshot
    quit

The time runs from reading the command to the last pod's arrival, so it includes the API
server creating the pods and sending the events, the server applying them, and the fan-out.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc

from agent.client import CHANNEL_OPTIONS, StreamFollower
from bench import kubeproc
from bench.procs import pin, raise_open_files_limit
from certs.tls import TlsFiles, channel_credentials
from protos import kiam_pb2, kiam_pb2_grpc

# How long a stream is retried until its first snapshot; the agent's own backoff between tries
# (agent/client.py: with no stream live, as a simulated agent's one stream is when it is lost or
# not yet opened, the agent tries again at least every 2 s).
CONNECT_FOR = 600.0
_BACKOFF_INITIAL, _BACKOFF_MAX_ALONE = 0.5, 2.0
# How long the old stream stays beside the new one after a hand-over (the agent's own).
HANDOVER_OVERLAP = StreamFollower.HANDOVER_OVERLAP


# The agent's own channel options (agent/client.py): its keepalive pings every 5 s, so that the
# server's keepalive enforcement (server/app.py: pings at least 4 s apart, or the connection is
# closed with "too_many_pings") is exercised by every simulated stream, and its reconnect
# backoff (gRPC's own default waits up to 2 minutes).
AGENT_CHANNEL_OPTIONS = tuple(CHANNEL_OPTIONS)


def _backoff(failures: int) -> float:
    if failures == 0:
        return random.uniform(0, _BACKOFF_INITIAL)
    ceiling = min(_BACKOFF_MAX_ALONE, _BACKOFF_INITIAL * 2**failures)
    return random.uniform(ceiling / 2, ceiling)


async def _left_ready(channel: grpc.aio.Channel) -> None:
    # As the agent sees a recycle: the channel leaves READY at the server's GOAWAY (the stream
    # runs on until the grace ends) or when the connection breaks (the stream ends too).
    while channel.get_state() is grpc.ChannelConnectivity.READY:
        await channel.wait_for_state_change(grpc.ChannelConnectivity.READY)


class _Leg:
    """One WatchNode call over a channel of its own, read by ``Streams._read``."""

    def __init__(self, streams: Streams, host: str, channel: grpc.aio.Channel) -> None:
        self.channel: grpc.aio.Channel | None = channel
        self.call = kiam_pb2_grpc.KiamServiceStub(channel).WatchNode(
            kiam_pb2.WatchNodeRequest(host_ip=host)
        )
        self.synced: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.drained: asyncio.Future | None = None  # done at the GOAWAY, once synced
        self.succeeded = False  # whether a successor was opened for it (one per leg)
        self.errored, self.cause = False, ""  # how the call ended, once closed
        self.task = asyncio.ensure_future(streams._read(host, self))

    async def close(self) -> None:
        """Ends the call and the channel, noting how the call had ended (``cause``)."""
        if self.channel is None:
            return
        for future in (self.task, self.drained):
            if future is not None and not future.done():
                future.cancel()
        self.call.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        error = None if self.task.cancelled() else self.task.exception()
        self.errored, self.cause = error is not None, _cause(error)
        await self.channel.close()
        # A closed grpc.aio channel keeps its connection until the channel object is freed, and
        # the call's error holds it (its traceback holds the frame reading the call): a storm's
        # retries left thousands of connections open until the cyclic collector ran.
        self.channel = self.call = self.task = self.drained = None


class Streams:
    def __init__(self, hosts: list[str]) -> None:
        self.hosts = hosts
        self.snapshots = 0
        self.failed: list[str] = []  # streams that ended with an error, and why
        # Streams that ended after their snapshot (a real agent would reconnect; here they are
        # counted, by status and details: "too_many_pings" is the server's keepalive policy).
        self.dropped: Counter[str] = Counter()
        self.dropped_at: list[tuple[float, str]] = []  # each loss: time.time(), cause
        self.moves = 0  # hand-overs to a new connection at the server's GOAWAY
        self.retries = 0  # attempts that failed before their stream's first snapshot
        self.retry_causes: Counter[str] = Counter()
        self.reconnect_retries = 0  # attempts after a loss that failed before their snapshot
        self.synced_hosts: set[str] = set()  # hosts whose stream has had a snapshot
        self._retiring: set[asyncio.Task] = set()
        self.give_up_at = time.perf_counter() + CONNECT_FOR
        self.live: set[str] = set()  # hosts whose stream has its snapshot and goes on
        self.all_snapshots = asyncio.Event()
        # While a watch command runs: the IPs expected, on which host, and what arrived.
        self.expected: dict[str, str] = {}
        self.delivered = 0
        self.misrouted = 0
        self.updates = 0
        self.watch_started = 0.0
        self.latencies: list[float] = []  # seconds from the watch command to each arrival
        self.done = asyncio.Event()
        # Each stream's credentials (identity key → AccessKeyId), and while a refresh command
        # runs: what each still waits for, and what arrived when.
        self.held: dict[str, dict[str, str]] = {}
        self.awaited: dict[str, dict[str, str]] = {}
        self.arrivals: dict[str, list[tuple[str, float]]] = {}
        self.refreshed = asyncio.Event()
        self.lifecycle: Lifecycle | None = None  # while a lifecycle command runs

    async def follow(self, host: str, open_channel: Callable[[], grpc.aio.Channel]) -> None:
        """One simulated agent's node stream, kept as the agent keeps it (agent/client.py
        StreamFollower): at the server's GOAWAY (its --max-connection-age) a second stream is
        opened on a new connection and takes over once synced (a move); a stream that ends
        otherwise is a loss, reconnected with the agent's backoff. Until its first snapshot a
        stream is retried for ``CONNECT_FOR`` seconds, then counted as failed."""
        failures = 0
        while True:
            leg = _Leg(self, host, open_channel())
            try:
                leg = await self._hold(host, leg, open_channel)
            finally:
                await leg.close()
            if leg.synced.done():
                self._lost(host, leg.cause)
                failures = 1 if leg.errored else 0
            elif host in self.synced_hosts:
                self.reconnect_retries += 1  # a reconnect that failed before its snapshot
                failures += 1
            elif time.perf_counter() < self.give_up_at:
                # A connect storm costs time, not nodes.
                self.retries += 1
                self.retry_causes[leg.cause] += 1
                failures += 1
            else:
                self.failed.append(f"{host}: {leg.cause}")
                if self.snapshots + len(self.failed) >= len(self.hosts):
                    self.all_snapshots.set()
                return
            await asyncio.sleep(_backoff(failures))

    async def _hold(self, host: str, current: _Leg, open_channel) -> _Leg:
        """Follows ``current`` and its successors until the node has no stream left; returns
        the last one (ended)."""
        successor: _Leg | None = None
        try:
            while True:
                waits: set[asyncio.Future] = {current.task}
                if current.synced.done() and current.drained is None:
                    current.drained = asyncio.ensure_future(_left_ready(current.channel))
                if current.drained is not None and not current.drained.done():
                    waits.add(current.drained)
                if successor is not None:
                    waits |= {successor.task, successor.synced}
                elif not current.synced.done():
                    waits.add(current.synced)  # (a done one would make this loop spin)
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if successor is not None and successor.synced.done():
                    self.moves += 1
                    self._retire_later(current)
                    current, successor = successor, None
                    continue
                if successor is not None and successor.task.done():
                    # Failed before its snapshot: the old stream runs on until it is cut.
                    await successor.close()
                    successor = None
                if current.task.done():
                    if successor is None:
                        return current
                    # Cut before its successor was synced: the successor is the reconnect.
                    await current.close()
                    self._lost(host, current.cause)
                    current, successor = successor, None
                    continue
                if (
                    current.drained is not None
                    and current.drained.done()
                    and not current.succeeded
                    and successor is None
                ):
                    current.succeeded = True
                    successor = _Leg(self, host, open_channel())
        finally:
            if successor is not None:
                await successor.close()

    def _retire_later(self, leg: _Leg) -> None:
        async def retire() -> None:
            if leg.task is None:
                return  # already closed
            try:
                await asyncio.wait_for(asyncio.shield(leg.task), HANDOVER_OVERLAP)
            except (TimeoutError, grpc.aio.AioRpcError):
                pass  # an old stream cut during the overlap is no loss: its successor is live
            finally:
                await leg.close()

        task = asyncio.ensure_future(retire())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _lost(self, host: str, cause: str) -> None:
        self.dropped[cause] += 1
        self.dropped_at.append((round(time.time(), 3), cause))
        self.live.discard(host)

    async def _read(self, host: str, leg: _Leg) -> None:
        held = self.held.setdefault(host, {})
        async for update in leg.call:
            snapshot = not leg.synced.done()
            if snapshot and update.reset:
                held.clear()
            if update.credentials or update.removed_identities:
                self._credentials(host, held, update)
            if snapshot:
                leg.synced.set_result(None)
                self.live.add(host)
                if host not in self.synced_hosts:
                    self.synced_hosts.add(host)
                    self.snapshots += 1
                    if self.snapshots + len(self.failed) >= len(self.hosts):
                        self.all_snapshots.set()
            else:
                self.updates += 1
            if self.lifecycle is not None:
                self.lifecycle.arrived(host, update)
            # A pod that arrives in a snapshot (its stream was reconnected or moved meanwhile)
            # has reached its node's stream too.
            for state in update.pods:
                want = self.expected.pop(state.ip, None)
                if want is None:
                    continue
                if want != host:
                    self.misrouted += 1
                self.delivered += 1
                self.latencies.append(time.perf_counter() - self.watch_started)
            if self.expected == {} and self.delivered:
                self.done.set()

    def _credentials(self, host: str, held: dict[str, str], update) -> None:
        for key in update.removed_identities:
            held.pop(key, None)
        awaited = self.awaited.get(host)
        for sent in update.credentials:
            access_key = sent.credentials.access_key_id
            held[sent.identity] = access_key
            if awaited and awaited.get(sent.identity) not in (None, access_key):
                del awaited[sent.identity]
                self.arrivals[host].append((access_key, time.time()))
                if not awaited:
                    del self.awaited[host]
                    if not self.awaited:
                        self.refreshed.set()

    async def refresh(self, seconds: float) -> dict:
        """Until every live stream has new credentials for each identity it holds now."""
        self.awaited = {host: dict(self.held[host]) for host in self.live if self.held.get(host)}
        self.arrivals = {host: [] for host in self.awaited}
        self.refreshed.clear()
        streams = len(self.awaited)
        if self.awaited:
            try:
                await asyncio.wait_for(self.refreshed.wait(), seconds)
            except TimeoutError:
                pass  # reported as streams still waiting
        return {"streams": streams, "waiting": len(self.awaited), **self.ended()}

    def ended(self) -> dict:
        """The streams that have ended since their snapshot (each reconnected), why and when,
        and the moves to a new connection at the server's GOAWAY."""
        return {
            "dropped": sum(self.dropped.values()),
            "dropped_causes": dict(self.dropped),
            "dropped_at": self.dropped_at,
            "moves": self.moves,
            "live": len(self.live),
            "reconnect_retries": self.reconnect_retries,
        }

    async def close(self) -> None:
        for task in self._retiring:
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)


def _cause(error: BaseException | None) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name} {error.details()}"
    return "ended" if error is None else repr(error)


class Lifecycle:
    """What a rollout (bench/kubeproc.py ``rollout``) must bring the streams: each new pod's
    state on its node's stream, each old pod's IP removed from its node's stream."""

    def __init__(self, states: dict[str, str], removals: dict[str, str]) -> None:
        self.states, self.removals = states, removals  # IP → the host that must get it
        self.home = {**states, **removals}  # kept, for what arrives anywhere after delivery
        self.arrivals: dict[str, float] = {}
        self.arrived_states = self.arrived_removals = self.misrouted = self.updates = 0
        self.done = asyncio.Event()
        if not states and not removals:
            self.done.set()

    def arrived(self, host: str, update) -> None:
        self.updates += 1
        for expected, ips in ((self.states, (s.ip for s in update.pods)),
                              (self.removals, update.removed_ips)):  # fmt: skip
            for ip in ips:
                home = self.home.get(ip)
                if home is not None and home != host:
                    self.misrouted += 1
                if expected.get(ip) != host:
                    continue
                del expected[ip]
                self.arrivals[ip] = time.time()
                if expected is self.states:
                    self.arrived_states += 1
                else:
                    self.arrived_removals += 1
        if not self.states and not self.removals:
            self.done.set()


async def follow_lifecycle(streams: Streams, words: list[str]) -> dict:
    old, new, count, nodes = (int(word) for word in words[:4])

    # Only pods on nodes whose stream is live can arrive (see "failed" in ready).
    def expected(first: int) -> dict[str, str]:
        hosts = (
            (kubeproc.pod_ip(k), kubeproc.node_ip(k % nodes)) for k in range(first, first + count)
        )
        return {ip: host for ip, host in hosts if host in streams.live}

    lifecycle = streams.lifecycle = Lifecycle(expected(new), expected(old))
    started = time.perf_counter()
    deadline = started + (float(words[5]) if words[5:] else 600)
    print("following", flush=True)  # the caller starts the rollout only now
    lost = 0  # expected on a stream that ended meanwhile: they cannot arrive
    try:
        while not lifecycle.done.is_set() and time.perf_counter() < deadline:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lifecycle.done.wait(), 0.5)
            for expected_ in (lifecycle.states, lifecycle.removals):
                gone = [ip for ip, host in expected_.items() if host not in streams.live]
                for ip in gone:
                    del expected_[ip]
                lost += len(gone)
            if not lifecycle.states and not lifecycle.removals:
                lifecycle.done.set()
    finally:
        streams.lifecycle = None
    await asyncio.to_thread(Path(words[4]).write_text, json.dumps(lifecycle.arrivals))
    return {
        "seconds": time.perf_counter() - started,
        "states": lifecycle.arrived_states,
        "removals": lifecycle.arrived_removals,
        "missing": len(lifecycle.states) + len(lifecycle.removals),
        "lost": lost,
        "misrouted": lifecycle.misrouted,
        "updates": lifecycle.updates,
        **streams.ended(),
    }


async def run(spec: dict) -> None:
    credentials = channel_credentials(TlsFiles.agent_in(Path(spec["tls"])))
    hosts: list[str] = spec["hosts"]
    channels = max(1, int(spec.get("channels") or len(hosts)))
    streams = Streams(hosts)
    started = time.perf_counter()
    openers = [_opener(spec["target"], credentials, n % channels) for n in range(len(hosts))]
    tasks = [
        asyncio.create_task(streams.follow(host, opener))
        for host, opener in zip(hosts, openers, strict=True)
    ]
    await streams.all_snapshots.wait()
    ready = {"seconds": time.perf_counter() - started, "failed": len(streams.failed)}
    ready["first_failures"] = streams.failed[:3]
    ready["retries"], ready["retry_causes"] = streams.retries, dict(streams.retry_causes)
    print("ready " + json.dumps(ready), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        command = line.decode().split()
        if command[:1] == ["watch"]:
            first, count, nodes = (int(word) for word in command[1:4])
            started = time.perf_counter()
            # Only pods on nodes whose stream connected can arrive (see "failed" in ready); one
            # reconnecting meanwhile brings them in its new snapshot.
            expected = {
                kubeproc.pod_ip(k): kubeproc.node_ip(k % nodes) for k in range(first, first + count)
            }
            streams.expected = {ip: h for ip, h in expected.items() if h in streams.synced_hosts}
            streams.delivered = streams.misrouted = streams.updates = 0
            streams.watch_started, streams.latencies = started, []
            streams.done.clear()
            print("watching", flush=True)  # the caller adds the pods only now
            try:
                await asyncio.wait_for(streams.done.wait(), 300)
            except TimeoutError:
                pass  # reported as fewer delivered than asked for
            result = {
                "seconds": time.perf_counter() - started,
                "delivered": streams.delivered,
                "misrouted": streams.misrouted,
                "updates": streams.updates,
                **streams.ended(),
                "latencies": [round(t, 4) for t in streams.latencies],
            }
            print("watched " + json.dumps(result), flush=True)
        elif command[:1] == ["refresh"]:
            result = await streams.refresh(float(command[1]))
            await asyncio.to_thread(Path(command[2]).write_text, json.dumps(streams.arrivals))
            print("refreshed " + json.dumps(result), flush=True)
        elif command[:1] == ["lifecycle"]:
            print(
                "followed " + json.dumps(await follow_lifecycle(streams, command[1:])), flush=True
            )
        elif command[:1] == ["status"]:
            print("status " + json.dumps(streams.ended()), flush=True)
        elif command[:1] == ["quit"]:
            break
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await streams.close()


def _opener(target: str, credentials, slot: int) -> Callable[[], grpc.aio.Channel]:
    """New channels for one simulated agent. Channels with equal arguments share one
    connection in gRPC, so each agent's are made distinct by its slot (agents in one slot share
    a connection, see ``channels``) and each new one by a generation: a stream moved at a
    GOAWAY, or reconnected, gets a connection of its own, as the agent's new channel does."""
    generations = itertools.count()

    def open_channel() -> grpc.aio.Channel:
        name = f"{slot}/{next(generations)}"
        return grpc.aio.secure_channel(
            target, credentials, options=[("podiam.bench.agent", name), *AGENT_CHANNEL_OPTIONS]
        )

    return open_channel


def main() -> None:
    spec = json.loads(sys.stdin.readline())
    pin(spec.get("cpu"))
    raise_open_files_limit()
    asyncio.run(run(spec))


if __name__ == "__main__":
    main()
