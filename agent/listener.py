"""The agent's listening sockets, shared with the next agent on the node during an upgrade.

A zero-downtime upgrade (the chart's DaemonSet surges: the new agent starts beside the old one
and the old one is stopped only once the new one is ready) needs two processes listening on the
node's port at once. Both bind with ``SO_REUSEPORT``; the new agent binds at once (a port held
by something else is a clear start-up error) but *listens* only when it can answer — its node
stream has delivered a snapshot — because a socket joins the kernel's choice only once it
listens.

The kernel spreads new connections over the listeners, and when the old agent closes its
listener, connections queued on it (handshake done, not yet accepted) are reset. So once it
listens, the new agent steers every new connection to itself (a one-instruction classic BPF
program on the port's reuseport group, no privilege needed): the old agent's queue only empties
from then on, and by the time it is stopped nothing is left there to reset. The alternatives
were Linux's ``net.ipv4.tcp_migrate_req`` sysctl (moves queued connections to another listener
on close; but a container's ``/proc/sys`` is read-only unless privileged) and handing the
listening socket itself to the new agent over a Unix socket on the node's disk (one accept
queue; a protocol and a shared hostPath). Measured, steering and the sysctl both remove the
resets; steering needs neither privilege nor node set-up.
"""

from __future__ import annotations

import asyncio
import ctypes
import socket

SO_ATTACH_REUSEPORT_CBPF = 51  # asm-generic/socket.h
_BPF_RET_K = 0x06  # BPF_RET | BPF_K: return the constant k


class _SockFilter(ctypes.Structure):  # struct sock_filter, linux/filter.h
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):  # struct sock_fprog
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


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
    """Whether a process (the agent being replaced) already accepts connections on the port.

    Asked with a blocking connect in a worker thread, so that the answer is the kernel's — a
    listener's queue takes the connection, or it is refused, at once on the node's own address
    — and not a matter of how soon this process's event loop gets round to it: at start-up the
    loop is busy (TLS material, gRPC channels), and on a busy core it once took longer than the
    timeout, which read as "nobody listens" and made a new agent listen before it could answer.
    No answer in time counts as someone listening: the safe side, where this agent listens only
    once its node stream has delivered a snapshot.
    """
    return await asyncio.to_thread(_connects, host, port, timeout)


def _connects(host: str, port: int, timeout: float) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
        except TimeoutError:
            return True
        except OSError:
            return False  # refused (nobody listens), or the address is not this machine's
    return True


def steer_new_connections_here(sock: socket.socket, *, index: int = 1) -> None:
    """Send every new connection on the port to ``sock``, the newest of its listeners.

    A classic BPF program on the port's reuseport group returns the index of the listener the
    kernel must pick; ``sock`` joined the group last, so with one agent before it, it is 1.
    From then on the old agent's accept queue only empties, and when it stops and closes its
    listener nothing is queued there to be reset. Once the old agent has left, 1 is out of
    range and the kernel falls back to its ordinary choice among whoever listens. Needs no
    privilege (classic BPF); raises OSError where the kernel refuses.
    """
    program = (_SockFilter * 1)(_SockFilter(_BPF_RET_K, 0, 0, index))
    fprog = _SockFprog(1, program)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))
