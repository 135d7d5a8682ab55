"""The agent's listening sockets, shared with the next agent on the node during an upgrade.

A zero-downtime upgrade (the chart's DaemonSet surges: the new agent starts beside the old one
and the old one is stopped only once the new one is ready) needs two processes listening on the
node's port at once. Both bind with ``SO_REUSEPORT``, so the kernel spreads new connections over
both; the new agent binds at once (a port held by something else is a clear start-up error) but
*listens* only when it can answer — its node stream has delivered a snapshot — because a socket
joins the kernel's choice only once it listens.

When the old agent closes its listener, connections the kernel had already queued on it (the
handshake done, not yet accepted) would be reset. Linux ≥ 5.14 moves them to another listener of
the same port instead when ``net.ipv4.tcp_migrate_req`` is 1 (a per network namespace sysctl:
for a hostNetwork agent, the node's). The agent turns it on when it may write ``/proc/sys``
and says so when it may not (a container's ``/proc/sys`` is read-only unless privileged); the
node's bootstrap can set it instead. Without it an upgrade can reset the few connections that
arrive in the instant the old listener closes; an SDK retries those.

This module would be unnecessary if the agent's listening socket were handed from the old
process to the new one (one socket, one accept queue), which needs a Unix socket shared by the
two pods on the node's disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from pathlib import Path

log = logging.getLogger("agent.listener")

MIGRATE_SYSCTL = Path("/proc/sys/net/ipv4/tcp_migrate_req")


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` with ``SO_REUSEPORT``, not yet listening.

    Raises OSError (EADDRINUSE) if a process that did not ask to share the port holds it.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def someone_listens(host: str, port: int, *, timeout: float = 1.0) -> bool:  # noqa: ASYNC109
    """Whether a process (the agent being replaced) already accepts connections on the port."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def enable_request_migration(sysctl: Path = MIGRATE_SYSCTL) -> bool:
    """Turn on ``net.ipv4.tcp_migrate_req`` if it is off and may be set; whether it is on."""
    try:
        if sysctl.read_text().strip() == "1":
            return True
    except OSError:
        log.warning(
            "%s is missing (Linux before 5.14): connections queued on this agent when it stops "
            "are reset rather than moved to its successor",
            sysctl,
        )
        return False
    try:
        sysctl.write_text("1")
    except OSError as error:
        log.warning(
            "net.ipv4.tcp_migrate_req is 0 and cannot be set here (%s): connections queued on "
            "this agent when it stops are reset rather than moved to its successor; set it on "
            "the node (sysctl -w net.ipv4.tcp_migrate_req=1)",
            error.strerror or error,
        )
        return False
    log.info("set net.ipv4.tcp_migrate_req=1: queued connections move to the next agent")
    return True
