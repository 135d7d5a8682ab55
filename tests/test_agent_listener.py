"""Two agents on one port during an upgrade: real sockets on loopback, as the kernel shares
them (``SO_REUSEPORT``) and as the newer agent steers new connections to itself."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from agent import listener

HOST = "127.0.0.1"


def accepted(sock: socket.socket) -> int:
    """How many connections wait in ``sock``'s accept queue (accepting and closing them)."""
    count = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


async def connect(port: int, n: int) -> list[socket.socket]:
    clients = [socket.create_connection((HOST, port), timeout=2) for _ in range(n)]
    await asyncio.sleep(0.1)  # the handshakes complete in the kernel
    return clients


async def test_a_second_agent_binds_the_same_port_and_a_stranger_cannot() -> None:
    old = listener.bind(HOST, 0)
    port = old.getsockname()[1]
    new = listener.bind(HOST, port)
    stranger = socket.socket()
    try:
        with pytest.raises(OSError) as error:
            stranger.bind((HOST, port))
        assert error.value.errno == 98  # EADDRINUSE: only sockets that asked may share
    finally:
        for sock in (old, new, stranger):
            sock.close()


async def test_only_a_listening_agent_is_found_and_given_connections() -> None:
    old = listener.bind(HOST, 0)
    port = old.getsockname()[1]
    new = None
    try:
        assert await listener.someone_listens(HOST, port) is False  # bound, not listening
        old.listen(128)
        assert await listener.someone_listens(HOST, port) is True  # that probe is queued
        new = listener.bind(HOST, port)  # the next agent, waiting for its snapshot
        clients = await connect(port, 20)
        assert not _listening(new)
        assert accepted(old) == 21, "a bound agent that does not listen must get nothing"
        for client in clients:
            client.close()
    finally:
        old.close()
        if new is not None:
            new.close()


def _listening(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


async def test_the_newest_agent_takes_every_new_connection_and_then_all_of_them() -> None:
    old = listener.bind(HOST, 0)
    port = old.getsockname()[1]
    old.listen(128)
    new = listener.bind(HOST, port)
    new.listen(128)
    try:
        spread = await connect(port, 40)
        shared = (accepted(old), accepted(new))
        assert sum(shared) == 40 and min(shared) > 0, "without steering the kernel spreads"

        listener.steer_new_connections_here(new)
        steered = await connect(port, 40)
        assert (accepted(old), accepted(new)) == (0, 40)

        # The old agent stops: nothing was queued on it to reset, and the newest takes all.
        old.close()
        after = await connect(port, 10)
        assert accepted(new) == 10
        for client in (*spread, *steered, *after):
            client.close()
    finally:
        old.close()
        new.close()


async def test_a_listening_agent_is_found_while_the_new_agents_loop_is_busy_starting() -> None:
    # The new agent asks at start-up, while its event loop is busy (imports, TLS material, gRPC
    # channels); on a node's busy core that took longer than the probe's timeout, the probe
    # concluded that nobody listened, and the new agent listened before its snapshot had come:
    # pods it was handed were refused "not connected" during a rollout.
    old = listener.bind(HOST, 0)
    port = old.getsockname()[1]
    try:
        old.listen(16)
        probe = asyncio.create_task(listener.someone_listens(HOST, port, timeout=0.2))
        await asyncio.sleep(0)  # the probe has started
        time.sleep(0.5)  # start-up work holding the event loop  # noqa: ASYNC251
        assert await probe is True
    finally:
        old.close()
