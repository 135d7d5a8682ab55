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
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

_MAIN_TABLE = 254
_IFF_UP = 0x1
_RETRY_SECONDS = 1.0


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
    """

    def __init__(self, pattern: str, *, on_change: Callable[[str], None] | None = None) -> None:
        self._matches = interface_matcher(pattern)
        self._on_change = on_change or (lambda ip: None)
        self._notify = self._on_change  # how a change reaches the event loop (see run)
        self.routes: dict[str, int] = {}  # ip → ifindex
        self._names: dict[int, str] = {}  # ifindex → name
        self.watching = False  # netlink is followed and the initial dump is in

    def interface(self, ip: str) -> int | None:
        """The interface index of ``ip``'s host route; None without one, or while netlink is
        not being followed (then nothing is known, and nothing may be vouched for)."""
        return self.routes.get(ip) if self.watching else None

    async def run(self) -> None:
        """Dump the routes, then follow netlink until cancelled. If netlink fails (a full
        receive buffer loses messages), it starts over with a new dump."""
        main = asyncio.get_running_loop()
        if not type(main).__module__.startswith("uvloop"):
            await self._follow()
            return
        # uvloop (the agent's loop) cannot open pyroute2's netlink datagram endpoint: follow
        # netlink on asyncio's own loop in a thread, and hand each change to the agent's loop.
        self._notify = lambda ip: main.call_soon_threadsafe(self._on_change, ip)
        ready = threading.Event()
        follower: dict[str, object] = {}

        def follow() -> None:
            loop = asyncio.new_event_loop()
            task = loop.create_task(self._follow())
            follower.update(loop=loop, task=task)
            ready.set()
            try:
                loop.run_until_complete(task)
            except asyncio.CancelledError:
                pass
            finally:
                loop.close()

        thread = threading.Thread(target=follow, name="host-routes", daemon=True)
        thread.start()
        await asyncio.to_thread(ready.wait)
        try:
            await asyncio.Event().wait()  # until cancelled
        finally:
            follower["loop"].call_soon_threadsafe(follower["task"].cancel)
            await asyncio.to_thread(thread.join, 2.0)

    async def _follow(self) -> None:
        try:
            from pyroute2 import AsyncIPRoute
        except ImportError:  # pragma: no cover - pyroute2 is in the agent extra
            log.warning("pyroute2 is not installed: no route evidence, --stale-grace applies")
            return
        while True:
            try:
                async with AsyncIPRoute() as ipr:
                    await ipr.bind()
                    async for link in await ipr.get_links():
                        self._link(link)
                    async for route in await ipr.get_routes(family=2):
                        self._route(route, added=True)
                    self.watching = True
                    log.info("watching host routes: %d pod route(s)", len(self.routes))
                    while True:
                        async for message in ipr.get():
                            self._message(message)
            except OSError as error:
                log.warning("lost track of host routes (%s): starting over", error)
            finally:
                self._forget()
            await asyncio.sleep(_RETRY_SECONDS)

    def _forget(self) -> None:
        # Nothing is vouched for until the next dump; the dump then reports every route as
        # new, and the node state compares each with the one it confirmed.
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
                self._notify(ip)
        elif self.routes.get(ip) == index:
            del self.routes[ip]
            self._notify(ip)

    def _drop_interface(self, index: int) -> None:
        for ip in [ip for ip, via in self.routes.items() if via == index]:
            del self.routes[ip]
            self._notify(ip)
