"""The agent's side of the gRPC contract: mutual-TLS channels to the podiam servers (rebuilt
when the certificate files are rotated), the node streams that keep ``NodeState`` current, and
the unary calls used when no stream can answer.

``--server-address`` names one or more ``host:port`` (comma-separated). Every address each name
resolves to is a replica; a node stream is pinned to one replica through its own channel, so
that two streams are sure to reach two different servers (agent/streams.py chooses them).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import time
from collections.abc import Callable

import grpc

from agent import metrics
from agent.replicas import Endpoint, parse_addresses
from certs.tls import TlsConfigError, TlsFiles, channel_credentials, files_stamp
from protos import kiam_pb2, kiam_pb2_grpc

log = logging.getLogger(__name__)

_BACKOFF_INITIAL = 0.5
_BACKOFF_MAX = 30.0
# While no stream is live the agent answers from memory only: try again at least this often,
# so that it is back within seconds of a server coming back (attempts to a dead server are
# refused at once and cost it nothing).
_BACKOFF_MAX_ALONE = 2.0
FIRST_UPDATE_SECONDS = 10.0


# Keepalive pings (answered by gRPC's core, no Python on either side) every 5 s, 2 s to answer:
# a node cut off from the servers (a partition: nothing refuses, packets just vanish) learns it
# within 7 s — its node streams end, and new pods are refused at once with a reason instead of
# waiting out their --pod-wait. The servers accept pings 4 s apart (server/app.py). Public: the
# bench's simulated agents (bench/nodestreams.py) open their channels with the same options.
KEEPALIVE_MS = 5_000
KEEPALIVE_TIMEOUT_MS = 2_000
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    # gRPC's core waits this long for any ping's answer (a minute by default), whatever the
    # keepalive timeout says.
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 10_000),
]
# A channel CONNECTING for less than this, straight from READY or IDLE (no failed attempt in
# between), is taken to be opening a connection, not cut off: a server recycling its
# connections (--max-connection-age: GOAWAY, and the connection closes) leaves the channel
# reconnecting, or IDLE until the next call wakes it, for the few milliseconds of a handshake.
# After a partition the attempts hang in CONNECTING, so past this bound it counts as
# unreachable again; within it a new pod's role question is still bounded by the short alone
# timeout (agent/lookup.py), so a partition is refused well inside a second either way.
CONNECTING_GRACE = 1.0
_SETTLED = (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.IDLE)


def _main_target(addresses: list[tuple[str, int]]) -> str:
    if len(addresses) > 1 and all(_is_ipv4(host) for host, _ in addresses):
        return "ipv4:" + ",".join(f"{host}:{port}" for host, port in addresses)
    host, port = addresses[0]
    return f"dns:///{host}:{port}"


def _is_ipv4(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 4
    except ValueError:
        return False


def open_pinned_channel(endpoint: Endpoint, tls: TlsFiles) -> grpc.aio.Channel:
    """A channel to one replica only, its certificate checked against the configured name."""
    return grpc.aio.secure_channel(
        endpoint.target,
        channel_credentials(tls),
        options=[("grpc.ssl_target_name_override", endpoint.name), *CHANNEL_OPTIONS],
    )


def open_channel(server_address: str, tls: TlsFiles) -> grpc.aio.Channel:
    """A channel that resolves ``server_address`` through DNS and spreads calls round-robin
    over every address it gets (a headless Service lists each server pod); round-robin skips
    replicas it cannot connect to. A list of IP addresses is balanced the same way."""
    addresses = parse_addresses(server_address)
    return grpc.aio.secure_channel(
        _main_target(addresses),
        channel_credentials(tls),
        options=[("grpc.lb_policy_name", "round_robin"), *CHANNEL_OPTIONS],
    )


class ServerConnection:
    """The channel to the servers. When the TLS files change (a certificate rotation), a new
    channel is opened with the new files; calls in flight finish on the old one, which is closed
    after a grace period, and ``rotated`` tells the node stream to move over."""

    def __init__(self, server_address: str, tls: TlsFiles, *, check_every: float = 10.0) -> None:
        self._address = server_address
        self.addresses = parse_addresses(server_address)
        self._tls = tls
        self._check_every = check_every
        self._stamp = files_stamp(tls)
        self.channel = open_channel(server_address, tls)
        self.stub = kiam_pb2_grpc.KiamServiceStub(self.channel)
        self._rotation_events: list[asyncio.Event] = []
        self.rotated = self.subscribe_rotation()
        self._channel_moved = self.subscribe_rotation()
        self._retired: set[asyncio.Task] = set()
        # When the channel was last seen READY or IDLE (monotonic), and the state watch_state
        # waits to change: READY or IDLE there means the watcher has not yet run since the
        # channel left it (its wake-up may come after a caller's question).
        self._settled_at: float | None = None
        self._watched: grpc.ChannelConnectivity | None = None

    def subscribe_rotation(self) -> asyncio.Event:
        """An event set on every certificate rotation (each stream clears its own)."""
        event = asyncio.Event()
        self._rotation_events.append(event)
        return event

    def pinned(self, endpoint: Endpoint) -> grpc.aio.Channel:
        """A new channel to ``endpoint`` with the current files; the caller closes it."""
        return open_pinned_channel(endpoint, self._tls)

    def unreachable(self) -> bool:
        """Whether the shared channel has no connection to any replica now: it failed to reach
        every one, or is still trying (after a partition, connection attempts hang rather than
        fail); an idle channel starts connecting. Lets a request refuse at once, with a reason,
        when no node stream is live either."""
        state = self.channel.get_state(try_to_connect=True)
        if state is grpc.ChannelConnectivity.CONNECTING:
            return not self.settled_within(CONNECTING_GRACE)
        return state is grpc.ChannelConnectivity.TRANSIENT_FAILURE

    def settled_within(self, seconds: float) -> bool:
        """Whether the shared channel was READY or IDLE at some moment in the last
        ``seconds`` (so it has not failed an attempt since then)."""
        if self._watched in _SETTLED or self.channel.get_state() in _SETTLED:
            return True
        return self._settled_at is not None and time.monotonic() - self._settled_at <= seconds

    async def watch_state(self) -> None:
        """Notes when the shared channel was last READY or IDLE (see ``unreachable``);
        follows the new channel after a certificate rotation."""
        while True:
            self._channel_moved.clear()
            channel = self.channel
            state = self._watched = channel.get_state()
            change = asyncio.ensure_future(channel.wait_for_state_change(state))
            moved = asyncio.ensure_future(self._channel_moved.wait())
            try:
                await asyncio.wait({change, moved}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                change.cancel()
                moved.cancel()
            if state in _SETTLED:
                self._settled_at = time.monotonic()  # it was settled until just now

    async def watch_files(self) -> None:
        while True:
            await asyncio.sleep(self._check_every)
            self.reload_if_changed()

    def reload_if_changed(self) -> bool:
        stamp = files_stamp(self._tls)
        if stamp == self._stamp:
            return False
        try:
            channel = open_channel(self._address, self._tls)
        except TlsConfigError as error:
            # Half-written or mismatched files: keep the working channel, try again later.
            log.warning("TLS files changed but are not usable yet, keeping the old: %s", error)
            return False
        self._stamp = stamp
        old, self.channel = self.channel, channel
        self.stub = kiam_pb2_grpc.KiamServiceStub(channel)
        retire = asyncio.create_task(old.close(grace=30))
        self._retired.add(retire)
        retire.add_done_callback(self._retired.discard)
        log.info("TLS files changed: reconnecting to the podiam server with the new certificate")
        for event in self._rotation_events:
            event.set()
        return True

    async def close(self) -> None:
        await self.channel.close()
        await asyncio.gather(*self._retired, return_exceptions=True)


class ServerClient:
    """The unary calls. They go to a replica whose node stream is live when there is one (a
    replica known to be up), else over the shared round-robin channel."""

    def __init__(
        self,
        connection: ServerConnection,
        *,
        live_stub: Callable[[], kiam_pb2_grpc.KiamServiceStub | None] | None = None,
    ) -> None:
        self._connection = connection
        self._live_stub = live_stub or (lambda: None)

    @property
    def _stub(self) -> kiam_pb2_grpc.KiamServiceStub:
        return self._live_stub() or self._connection.stub

    def unreachable(self) -> bool:
        return self._live_stub() is None and self._connection.unreachable()

    async def pod_role(self, ip: str, *, seconds: float) -> str:
        request = kiam_pb2.GetPodRoleRequest(ip=ip)
        role = await _counted("GetPodRole", self._stub.GetPodRole(request, timeout=seconds))
        return role.name

    async def pod_credentials(self, ip: str, role: str, *, seconds: float):
        request = kiam_pb2.GetPodCredentialsRequest(ip=ip, role=role)
        return await _counted(
            "GetPodCredentials", self._stub.GetPodCredentials(request, timeout=seconds)
        )

    async def token_credentials(self, token: str, *, seconds: float):
        request = kiam_pb2.TokenCredentialsRequest(token=token)
        return await _counted(
            "GetTokenCredentials", self._stub.GetTokenCredentials(request, timeout=seconds)
        )

    def watch_node(self, host_ip: str):
        return self._stub.WatchNode(kiam_pb2.WatchNodeRequest(host_ip=host_ip))


async def _counted(rpc: str, call):
    try:
        answer = await call
    except grpc.aio.AioRpcError as error:
        metrics.FALLBACK_CALLS.labels(rpc=rpc, outcome=error.code().name).inc()
        raise
    metrics.FALLBACK_CALLS.labels(rpc=rpc, outcome="OK").inc()
    return answer


class _Rotated(Exception):
    """The certificate files changed: follow the stream again on the new channel."""


class _Stalled(Exception):
    """The stream was opened but brought nothing."""


class _NoReplica(Exception):
    """Every replica is already followed by the other stream (or none resolves)."""


class ReplicaChooser:
    """Picks the replica a pinned stream follows next (agent/streams.py implements it)."""

    async def choose(  # pragma: no cover
        self, follower: StreamFollower, *, succeeding: bool = False
    ) -> Endpoint | None:
        raise NotImplementedError

    def failed(self, endpoint: Endpoint) -> None:  # pragma: no cover
        raise NotImplementedError


class _Leg:
    """One WatchNode call, applying to one view of the state; over a channel of its own when
    the stream is pinned (``channel``), which it closes."""

    def __init__(self, follower: StreamFollower, view, stream, stub, channel, endpoint) -> None:
        self.endpoint = endpoint
        self.view = view
        self.stream = stream
        self.stub = stub  # for unary calls once synced (None: the shared channel)
        self.channel = channel
        self.synced = False
        self.task = asyncio.ensure_future(follower._apply_all(self))
        self.task.add_done_callback(lambda _: follower._changed.set())
        # Watches its channel once synced (pinned streams); done at the GOAWAY.
        self.drained: asyncio.Future | None = None
        self.succeeded = False  # whether a successor was opened for it (one per leg)

    async def close(self) -> None:
        for future in (self.task, self.drained):
            if future is not None and not future.done():
                future.cancel()
        self.stream.cancel()  # a no-op when the call has already ended
        await asyncio.gather(self.task, return_exceptions=True)
        if self.channel is not None:
            await self.channel.close(grace=None)


async def _left_ready(channel: grpc.aio.Channel) -> None:
    # A pinned channel leaves READY when its connection goes: the server's GOAWAY (its
    # --max-connection-age; the calls already open run on until its grace ends) or a broken
    # connection (then the stream ends too).
    while channel.get_state() is grpc.ChannelConnectivity.READY:
        await channel.wait_for_state_change(grpc.ChannelConnectivity.READY)


class StreamFollower:
    """Keeps ``state`` in step with a server's node stream, reconnecting with backoff.

    Without a ``chooser`` the stream goes over the client's shared channel (any replica);
    with one, each attempt is pinned to the replica it picks, over a channel of its own.
    With a ``spare`` view as well, a stream whose connection the server recycles is handed
    over, make-before-break: when its channel leaves READY (the GOAWAY) a second stream is
    opened to the same replica into the spare view, and the old one is closed once the new
    one has been synced for ``HANDOVER_OVERLAP`` (or when the server cuts it), so the node
    is never without a live stream for a recycle.
    """

    HANDOVER_OVERLAP = 2.0

    def __init__(
        self,
        client: ServerClient,
        state,
        *,
        host_ip: str,
        server: str,
        rotated: asyncio.Event | None = None,
        first_update_seconds: float = FIRST_UPDATE_SECONDS,
        on_synced: Callable[[], None] | None = None,
        connection: ServerConnection | None = None,
        chooser: ReplicaChooser | None = None,
        idle_seconds: float = 5.0,
        alone: Callable[[], bool] | None = None,
        spare=None,
    ) -> None:
        self._client = client
        self._on_synced = on_synced
        self._first_update_seconds = first_update_seconds
        self._state = state  # a NodeState or one StreamView of it: has apply() and lost()
        # The views the follower's streams apply to: the second one, if any, is for the
        # stream that takes over during a handover (both views are live for the overlap).
        self._views = [state] if spare is None else [state, spare]
        self._host_ip = host_ip
        self._server = server
        self._rotated = rotated or asyncio.Event()
        self._connection = connection
        self._chooser = chooser
        self._idle_seconds = idle_seconds
        self._alone = alone or (lambda: False)  # whether no stream at all is live
        # Set once the first snapshot arrived: until then the agent serves no credentials.
        self.synced_once = asyncio.Event()
        self._received = False  # whether the current stream brought anything
        self.endpoint: Endpoint | None = None  # the replica followed now (pinned streams)
        self.next_endpoint: Endpoint | None = None  # the one a hand-over is opening
        self.stub: kiam_pb2_grpc.KiamServiceStub | None = None  # its channel, while synced
        self._idle_logged = False
        self._changed = asyncio.Event()  # something a handover waits on happened

    @property
    def live(self) -> bool:
        return any(getattr(view, "live", False) for view in self._views) and self.stub is not None

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                await self._follow()
                reason, failures = "the server ended the stream", 0
            except _Rotated:
                reason, failures = "the certificate was rotated", 0
            except _NoReplica:
                # One replica only (or the other stream holds the only live one): look again
                # soon, quietly; the agent serves from the other stream meanwhile.
                if not self._idle_logged:
                    log.info("no second podiam server replica to follow; looking again every "
                             "%gs", self._idle_seconds)  # fmt: skip
                    self._idle_logged = True
                await asyncio.sleep(self._idle_seconds)
                continue
            except grpc.aio.AioRpcError as error:
                reason, failures = _why(error), failures + 1
            except _Stalled as error:
                reason, failures = str(error), failures + 1
            server = str(self.endpoint) if self.endpoint is not None else self._server
            if self.endpoint is not None and self._chooser is not None and failures:
                self._chooser.failed(self.endpoint)
            self.endpoint = None
            # This stream's word ends here; NodeState decides what of it still holds (the
            # other stream's, or the stale rules when no stream is live).
            for view in self._views:
                view.lost()
            metrics.STREAM_RECONNECTS.inc()
            delay = _backoff(failures, _BACKOFF_MAX_ALONE if self._alone() else _BACKOFF_MAX)
            if self._received:
                log.warning(
                    "node stream from podiam server %s lost (%s); reconnecting in %.1fs",
                    server, reason, delay,
                )  # fmt: skip
            else:
                # Nothing ever came: nothing was lost, the server was never reached (an agent
                # started before its server, a wrong address, a certificate the server refuses).
                log.warning(
                    "cannot open the node stream from podiam server %s (%s); retrying in %.1fs",
                    server, reason, delay,
                )  # fmt: skip
            await asyncio.sleep(delay)

    async def _follow(self) -> None:
        self._rotated.clear()
        self._received = False
        endpoint = None
        if self._chooser is not None and self._connection is not None:
            endpoint = await self._chooser.choose(self)
            if endpoint is None:
                raise _NoReplica
            self._idle_logged = False
            self.endpoint = endpoint
            current = self._open(endpoint, self._views[0])
        else:
            stream = self._client.watch_node(self._host_ip)
            current = _Leg(self, self._views[0], stream, None, None, None)
        successor: _Leg | None = None  # opened at the GOAWAY, not synced yet
        retiring: _Leg | None = None  # replaced, still live until the overlap ends
        retire_at = 0.0
        loop = asyncio.get_running_loop()
        rotation = asyncio.ensure_future(self._rotated.wait())
        rotation.add_done_callback(lambda _: self._changed.set())
        try:
            while True:
                self._changed.clear()
                if rotation.done():
                    raise _Rotated
                if retiring is not None and (retiring.task.done() or loop.time() >= retire_at):
                    await self._retire(retiring)
                    retiring = None
                if successor is not None and successor.synced:
                    retiring, current, successor = current, successor, None
                    self.endpoint, self.next_endpoint = current.endpoint, None
                    retire_at = loop.time() + self.HANDOVER_OVERLAP
                    loop.call_later(self.HANDOVER_OVERLAP, self._changed.set)
                    metrics.STREAM_HANDOVERS.inc()
                    log.info("node stream moved from %s to a new connection to %s (the "
                             "server is recycling the old one)",
                             retiring.endpoint, current.endpoint)  # fmt: skip
                elif successor is not None and successor.task.done():
                    # It failed before its snapshot: the old stream runs on until the server
                    # cuts it, and is then reconnected as any lost stream.
                    error = successor.task.exception()
                    log.warning("cannot open a second node stream from %s ahead of the "
                                "recycle (%s)", successor.endpoint, _why(error))  # fmt: skip
                    if self._chooser is not None and successor.endpoint != current.endpoint:
                        self._chooser.failed(successor.endpoint)
                    await self._retire(successor)
                    successor, self.next_endpoint = None, None
                if current.task.done():
                    if successor is None:
                        current.task.result()  # the stream's end, or its error
                        return
                    # Cut before its successor was synced: the successor is the reconnect.
                    error = current.task.exception()
                    log.warning("node stream from %s lost (%s) while its successor connects",
                                current.endpoint, _why(error))  # fmt: skip
                    metrics.STREAM_RECONNECTS.inc()
                    await self._retire(current)
                    current, successor = successor, None
                    self.endpoint, self.next_endpoint = current.endpoint, None
                    continue
                if (
                    endpoint is not None
                    and len(self._views) > 1
                    and current.synced
                    and current.drained is None
                    and successor is None
                    and retiring is None
                ):
                    current.drained = asyncio.ensure_future(_left_ready(current.channel))
                    current.drained.add_done_callback(lambda _: self._changed.set())
                if (
                    current.drained is not None
                    and current.drained.done()
                    and not current.succeeded
                    and successor is None
                    and retiring is None
                ):
                    current.succeeded = True
                    assert self._chooser is not None
                    chosen = await self._chooser.choose(self, succeeding=True)
                    successor = self._open(chosen or current.endpoint, self._spare_of(current))
                    continue  # the choice took a moment: look at everything again
                await self._changed.wait()
        finally:
            self.stub = None
            self.next_endpoint = None
            rotation.cancel()
            for leg in (successor, retiring):
                if leg is not None:
                    await self._retire(leg)
            await current.close()

    def _open(self, endpoint: Endpoint, view) -> _Leg:
        assert self._connection is not None
        channel = self._connection.pinned(endpoint)
        stub = kiam_pb2_grpc.KiamServiceStub(channel)
        stream = stub.WatchNode(kiam_pb2.WatchNodeRequest(host_ip=self._host_ip))
        return _Leg(self, view, stream, stub, channel, endpoint)

    def _spare_of(self, leg: _Leg):
        return next(view for view in self._views if view is not leg.view)

    async def _retire(self, leg: _Leg) -> None:
        if self.stub is leg.stub:
            self.stub = None
        await leg.close()
        leg.view.lost()

    async def _apply_all(self, leg: _Leg) -> None:
        # The snapshot comes at once from a server that is up; a call stuck connecting (a
        # black-holed address) would otherwise wait silently, so give up and say so.
        stream = leg.stream
        try:
            update = await asyncio.wait_for(stream.read(), self._first_update_seconds)
        except TimeoutError:
            raise _Stalled(f"no snapshot within {self._first_update_seconds:g}s") from None
        while update is not grpc.aio.EOF:
            self._received = True
            leg.view.apply(update)
            if update.synced and not leg.synced:
                # Once per stream: the snapshot is applied, the state answers for the node.
                leg.synced = True
                self.stub = leg.stub
                self._changed.set()
                if not self.synced_once.is_set():
                    where = self.endpoint if self.endpoint is not None else self._server
                    log.info("node stream from %s synced", where)
                    self.synced_once.set()
                if self._on_synced is not None:
                    self._on_synced()
            update = await stream.read()


def _why(error: BaseException | None) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return str(error) if error is not None else "it ended"


def _backoff(failures: int, most: float = _BACKOFF_MAX) -> float:
    if failures == 0:
        return random.uniform(0, _BACKOFF_INITIAL)
    ceiling = min(most, _BACKOFF_INITIAL * 2**failures)
    return random.uniform(ceiling / 2, ceiling)
