"""Local evidence that a pod IP still belongs to the pod the server last described.

CNIs such as the AWS VPC CNI (``eni*``), Calico (``cali*``) and Cilium (``lxc*``) give every pod
its own veth and a /32 host route to the pod's IP through it. When the pod goes, its veth goes,
and the route with it; a new pod that gets the IP later comes with a new veth (a new interface
index). So while the route to an IP runs through the interface it ran through when the server
described the pod, no other pod can hold that IP on this node. The agent uses this to keep
serving cached credentials while no server can be reached, and to stop serving an entry the
moment its route vanishes or moves (agent/state.py decides; this module only watches).

The kernel announces route changes over netlink (RTM_NEWROUTE / RTM_DELROUTE), but not the
IPv4 routes it drops with a deleted or downed interface: those are inferred from RTM_DELLINK and
from RTM_NEWLINK without IFF_UP. Without this evidence (no such routes, netlink unavailable) the
agent falls back to a short grace period instead (``--stale-grace``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)

_MAIN_TABLE = 254
_IFF_UP = 0x1
_RETRY_SECONDS = 1.0
_RTMGRP_LINK = 0x1
_RTMGRP_IPV4_ROUTE = 0x40
_RECEIVE_BUFFER = 4 << 20
_RECEIVE_BYTES = 1 << 16
_LINKS, _ROUTES = 1, 2  # the dumps' sequence numbers


def interface_matcher(pattern: str) -> Callable[[str], bool]:
    """The ``--host-interface`` pattern as iptables reads it: a trailing ``+`` matches any
    suffix, a leading ``!`` inverts."""
    inverted = pattern.startswith("!")
    body = pattern[1:] if inverted else pattern
    if body.endswith("+"):
        prefix = body[:-1]

        def matches(name: str) -> bool:
            return name.startswith(prefix) != inverted
    else:

        def matches(name: str) -> bool:
            return (name == body) != inverted

    return matches


class HostRoutes:
    """Pod IP → interface index of its /32 host route, kept current from netlink.

    ``on_change(ip)`` is called on the event loop whenever an IP's route appears, vanishes or
    moves, so the node state can stop serving it at once.

    Netlink is read on the event loop itself, from a non-blocking socket, and ``settle()`` reads
    whatever the kernel has queued so far, at once. That is what makes the evidence exact rather
    than merely prompt: the kernel queues its messages about a deleted veth before the call that
    deleted it returns, so before a new pod with the same IP can send its first packet, and
    before the API (and the server, and the node stream) can hear of that pod. The listener
    settles once per batch of accepted connections, and the node state before each stream
    update, so neither a new pod's request nor its confirmation is ever judged by a route view
    older than the request or the update. (An earlier version followed netlink in a thread and
    handed changes over to the loop: the view lagged the kernel by milliseconds, seconds on a
    starved machine, and inside that lag a new pod could be answered from the old pod's entry.)
    """

    def __init__(self, pattern: str, *, on_change: Callable[[str], None] | None = None) -> None:
        self._matches = interface_matcher(pattern)
        self._on_change = on_change or (lambda ip: None)
        self.routes: dict[str, int] = {}  # ip → ifindex
        self._names: dict[int, str] = {}  # ifindex → name
        self.watching = False  # netlink is followed and the initial dump is in
        self._sock: socket.socket | None = None
        self._marshal = None
        self._broken: asyncio.Event | None = None
        self._before: dict[str, int] = {}  # the routes known before netlink was lost

    def interface(self, ip: str) -> int | None:
        """The interface index of ``ip``'s host route; None without one, or while netlink is
        not being followed (then nothing is known, and nothing may be vouched for)."""
        return self.routes.get(ip) if self.watching else None

    async def run(self) -> None:
        """Dump the links and routes, then follow netlink until cancelled. If netlink fails (a
        full receive buffer loses messages), it starts over with a new dump."""
        try:
            from pyroute2.netlink.rtnl.marshal import MarshalRtnl
        except ImportError:  # pragma: no cover - pyroute2 is in the agent extra
            log.warning("pyroute2 is not installed: no route evidence, --stale-grace applies")
            return
        loop = asyncio.get_running_loop()
        while True:
            self._broken = asyncio.Event()
            try:
                self._open(MarshalRtnl())
                assert self._sock is not None
                fd = self._sock.fileno()
                loop.add_reader(fd, self.settle)
                try:
                    await self._broken.wait()
                finally:
                    loop.remove_reader(fd)
            except OSError as error:
                log.warning("cannot follow host routes (%s): starting over", error)
            finally:
                self._close()
            await asyncio.sleep(_RETRY_SECONDS)

    def settle(self) -> None:
        """Apply every netlink message the kernel has queued (called on the event loop)."""
        sock = self._sock
        if sock is None or self._broken is None or self._broken.is_set():
            return
        while True:
            try:
                data = sock.recv(_RECEIVE_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                log.warning("lost track of host routes (%s): starting over", error)
                self._fail()
                return
            for message in self._marshal.parse(data):
                if not self._take(message):
                    self._fail()
                    return

    def _open(self, marshal) -> None:
        sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
            socket.NETLINK_ROUTE,
        )  # fmt: skip
        try:
            # Room for a burst of pod churn between two turns of the loop; a full buffer loses
            # messages (ENOBUFS), and then everything is dumped again.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECEIVE_BUFFER)
            sock.bind((0, _RTMGRP_LINK | _RTMGRP_IPV4_ROUTE))
        except OSError:
            sock.close()
            raise
        self._sock, self._marshal = sock, marshal
        # Subscribed first, then dumped: a change during the dump is seen twice at worst, and
        # applying a route or link twice changes nothing. One dump at a time per socket, so
        # the routes are asked for when the links' dump is done.
        self._dump(_LINKS)

    def _dump(self, what: int) -> None:
        from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST
        from pyroute2.netlink.rtnl import RTM_GETLINK, RTM_GETROUTE
        from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
        from pyroute2.netlink.rtnl.rtmsg import rtmsg

        request = ifinfmsg() if what == _LINKS else rtmsg()
        request["family"] = 0 if what == _LINKS else socket.AF_INET
        request["header"]["type"] = RTM_GETLINK if what == _LINKS else RTM_GETROUTE
        request["header"]["flags"] = NLM_F_REQUEST | NLM_F_DUMP
        request["header"]["sequence_number"] = what
        request.encode()
        assert self._sock is not None
        self._sock.send(request.data)

    def _take(self, message) -> bool:
        """Apply one message; False when netlink refused a dump (start over)."""
        event = message.get("event")
        if event == "NLMSG_DONE":
            sequence = message["header"]["sequence_number"]
            if sequence == _LINKS:
                self._dump(_ROUTES)
            elif sequence == _ROUTES:
                self._dumped()
            return True
        if event == "NLMSG_ERROR":
            return False
        self._message(message)
        return True

    def _dumped(self) -> None:
        self.watching = True
        log.info("watching host routes: %d pod route(s)", len(self.routes))
        # Routes that went while netlink was lost: the dump cannot report an absence.
        for ip in [ip for ip in self._before if ip not in self.routes]:
            self._on_change(ip)
        self._before = {}

    def _fail(self) -> None:
        # run() closes the socket once it has stopped reading it.
        if self._broken is not None:
            self._broken.set()

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        # Nothing is vouched for until the next dump; the dump then reports every route as
        # new, and the node state compares each with the one it confirmed.
        if self.watching:
            self._before = dict(self.routes)
        self.watching = False
        self.routes = {}

    def _message(self, message) -> None:
        event = message.get("event")
        if event == "RTM_NEWROUTE":
            self._route(message, added=True)
        elif event == "RTM_DELROUTE":
            self._route(message, added=False)
        elif event == "RTM_NEWLINK":
            self._link(message)
            if not message["flags"] & _IFF_UP:
                self._drop_interface(message["index"])
        elif event == "RTM_DELLINK":
            self._names.pop(message["index"], None)
            self._drop_interface(message["index"])

    def _link(self, message) -> None:
        name = message.get("ifname")
        if name:
            self._names[message["index"]] = name

    def _route(self, message, *, added: bool) -> None:
        if message["family"] != 2 or message["dst_len"] != 32:
            return
        if message["table"] != _MAIN_TABLE:
            return
        ip, index = message.get("dst"), message.get("oif")
        if not ip or index is None:
            return
        if added:
            if not self._matches(self._names.get(index, "")):
                return
            if self.routes.get(ip) != index:
                self.routes[ip] = index
                self._on_change(ip)
        elif self.routes.get(ip) == index:
            del self.routes[ip]
            self._on_change(ip)

    def _drop_interface(self, index: int) -> None:
        for ip in [ip for ip, via in self.routes.items() if via == index]:
            del self.routes[ip]
            self._on_change(ip)
