"""The agent's side of the gRPC contract: one mutual-TLS channel to the podiam servers, the
node stream that keeps ``NodeState`` current, and the unary calls used when it cannot answer.
"""

from __future__ import annotations

import asyncio
import logging
import random

import grpc

from agent import metrics
from agent.state import NodeState
from certs.tls import TlsFiles, channel_credentials
from protos import kiam_pb2, kiam_pb2_grpc

log = logging.getLogger(__name__)

_BACKOFF_INITIAL = 0.5
_BACKOFF_MAX = 30.0


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


class ServerClient:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = kiam_pb2_grpc.KiamServiceStub(channel)

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


class StreamFollower:
    """Keeps ``state`` in step with the server's node stream, reconnecting with backoff."""

    def __init__(self, client: ServerClient, state: NodeState, *, host_ip: str, server: str):
        self._client = client
        self._state = state
        self._host_ip = host_ip
        self._server = server
        # Set once the first snapshot arrived: until then the agent serves no credentials.
        self.connected = asyncio.Event()

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                await self._follow()
                reason = "the server ended the stream"
            except grpc.aio.AioRpcError as error:
                reason = f"{error.code().name}: {error.details()}"
            self._state.lost()
            metrics.STREAM_CONNECTED.set(0)
            metrics.STREAM_RECONNECTS.inc()
            failures = 0 if reason.startswith("the server ended") else failures + 1
            delay = _backoff(failures)
            log.warning(
                "node stream from podiam server %s lost (%s); reconnecting in %.1fs",
                self._server,
                reason,
                delay,
            )
            await asyncio.sleep(delay)

    async def _follow(self) -> None:
        stream = self._client.watch_node(self._host_ip)
        try:
            async for update in stream:
                self._state.apply(update)
                if update.synced and not self.connected.is_set():
                    log.info("node stream from %s synced", self._server)
                    self.connected.set()
                if update.synced:
                    metrics.STREAM_CONNECTED.set(1)
        finally:
            stream.cancel()


def _backoff(failures: int) -> float:
    if failures == 0:
        return random.uniform(0, _BACKOFF_INITIAL)
    ceiling = min(_BACKOFF_MAX, _BACKOFF_INITIAL * 2**failures)
    return random.uniform(ceiling / 2, ceiling)
