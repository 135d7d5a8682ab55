"""The agent's side of the gRPC contract: a mutual-TLS channel to the podiam servers (rebuilt
when the certificate files are rotated), the node stream that keeps ``NodeState`` current, and
the unary calls used when the stream cannot answer.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

import grpc

from agent import metrics
from agent.state import NodeState
from certs.tls import TlsConfigError, TlsFiles, channel_credentials, files_stamp
from protos import kiam_pb2, kiam_pb2_grpc

log = logging.getLogger(__name__)

_BACKOFF_INITIAL = 0.5
_BACKOFF_MAX = 30.0
FIRST_UPDATE_SECONDS = 10.0


def open_channel(server_address: str, tls: TlsFiles) -> grpc.aio.Channel:
    """A channel that resolves ``server_address`` through DNS and spreads calls round-robin
    over every address it gets (a headless Service lists each server pod)."""
    return grpc.aio.secure_channel(
        f"dns:///{server_address}",
        channel_credentials(tls),
        options=[
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            # Reconnect quickly after a server restart; the stream is what keeps us fast.
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 10_000),
        ],
    )


class ServerConnection:
    """The channel to the servers. When the TLS files change (a certificate rotation), a new
    channel is opened with the new files; calls in flight finish on the old one, which is closed
    after a grace period, and ``rotated`` tells the node stream to move over."""

    def __init__(self, server_address: str, tls: TlsFiles, *, check_every: float = 10.0) -> None:
        self._address = server_address
        self._tls = tls
        self._check_every = check_every
        self._stamp = files_stamp(tls)
        self.channel = open_channel(server_address, tls)
        self.stub = kiam_pb2_grpc.KiamServiceStub(self.channel)
        self.rotated = asyncio.Event()
        self._retired: set[asyncio.Task] = set()

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
        self.rotated.set()
        return True

    async def close(self) -> None:
        await self.channel.close()
        await asyncio.gather(*self._retired, return_exceptions=True)


class ServerClient:
    def __init__(self, connection: ServerConnection) -> None:
        self._connection = connection

    @property
    def _stub(self) -> kiam_pb2_grpc.KiamServiceStub:
        return self._connection.stub

    async def pod_role(self, ip: str, *, seconds: float) -> str:
        request = kiam_pb2.GetPodRoleRequest(ip=ip)
        role = await _counted("GetPodRole", self._stub.GetPodRole(request, timeout=seconds))
        return role.name

    async def pod_credentials(self, ip: str, role: str, *, seconds: float):
        request = kiam_pb2.GetPodCredentialsRequest(ip=ip, role=role)
        return await _counted(
            "GetPodCredentials", self._stub.GetPodCredentials(request, timeout=seconds)
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


class StreamFollower:
    """Keeps ``state`` in step with the server's node stream, reconnecting with backoff."""

    def __init__(
        self,
        client: ServerClient,
        state: NodeState,
        *,
        host_ip: str,
        server: str,
        rotated: asyncio.Event | None = None,
        first_update_seconds: float = FIRST_UPDATE_SECONDS,
        on_synced: Callable[[], None] | None = None,
    ) -> None:
        self._client = client
        self._on_synced = on_synced
        self._first_update_seconds = first_update_seconds
        self._state = state
        self._host_ip = host_ip
        self._server = server
        self._rotated = rotated or asyncio.Event()
        # Set once the first snapshot arrived, never cleared: until then the agent serves no
        # credentials (after a later loss it asks the server per request instead).
        self.synced_once = asyncio.Event()
        self._received = False  # whether the current stream brought anything

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                await self._follow()
                reason, failures = "the server ended the stream", 0
            except _Rotated:
                reason, failures = "the certificate was rotated", 0
            except grpc.aio.AioRpcError as error:
                reason, failures = f"{error.code().name}: {error.details()}", failures + 1
            except _Stalled as error:
                reason, failures = str(error), failures + 1
            # Whatever the stream said may be stale now (a deleted pod's IP may be reused
            # before we are back): forget it; requests go to the server meanwhile.
            self._state.lost()
            metrics.STREAM_CONNECTED.set(0)
            metrics.STREAM_RECONNECTS.inc()
            delay = _backoff(failures)
            if self._received:
                log.warning(
                    "node stream from podiam server %s lost (%s); reconnecting in %.1fs",
                    self._server, reason, delay,
                )  # fmt: skip
            else:
                # Nothing ever came: nothing was lost, the server was never reached (an agent
                # started before its server, a wrong address, a certificate the server refuses).
                log.warning(
                    "cannot open the node stream from podiam server %s (%s); retrying in %.1fs",
                    self._server, reason, delay,
                )  # fmt: skip
            await asyncio.sleep(delay)

    async def _follow(self) -> None:
        self._rotated.clear()
        self._received = False
        stream = self._client.watch_node(self._host_ip)
        updates = asyncio.ensure_future(self._apply_all(stream))
        rotation = asyncio.ensure_future(self._rotated.wait())
        try:
            await asyncio.wait({updates, rotation}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            rotation.cancel()
            stream.cancel()  # a no-op when the call has already ended
            if not updates.done():
                updates.cancel()
                await asyncio.gather(updates, return_exceptions=True)
        if updates.cancelled():
            raise _Rotated
        updates.result()  # the stream's end, or its error

    async def _apply_all(self, stream) -> None:
        # The snapshot comes at once from a server that is up; a call stuck connecting (a
        # black-holed address) would otherwise wait silently, so give up and say so.
        try:
            update = await asyncio.wait_for(stream.read(), self._first_update_seconds)
        except TimeoutError:
            raise _Stalled(f"no snapshot within {self._first_update_seconds:g}s") from None
        synced = False
        while update is not grpc.aio.EOF:
            self._received = True
            self._state.apply(update)
            if update.synced and not synced:
                # Once per stream: the snapshot is applied, the state answers for the node.
                synced = True
                metrics.STREAM_CONNECTED.set(1)
                if not self.synced_once.is_set():
                    log.info("node stream from %s synced", self._server)
                    self.synced_once.set()
                if self._on_synced is not None:
                    self._on_synced()
            update = await stream.read()


def _backoff(failures: int) -> float:
    if failures == 0:
        return random.uniform(0, _BACKOFF_INITIAL)
    ceiling = min(_BACKOFF_MAX, _BACKOFF_INITIAL * 2**failures)
    return random.uniform(ceiling / 2, ceiling)
