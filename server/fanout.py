"""Which agents are listening, and which of them each change concerns.

Two kinds of change alter what an agent must hold. A pod changes: an IP now names another pod,
no pod, several pods, or a pod with a different grant — the registry knows these. An identity's
credentials change: refreshed, or withdrawn when the identity is released or its credentials
expire — the credentials cache knows these. Neither knows which agents are connected, and
neither should. ``NodeFanout`` is the one place that does: each node stream subscribes a
``NodeWatch`` for its node; the registry publishes "IP x changed on nodes {…}", the cache
publishes "identity k now has credentials C" or "… has none", and the fan-out marks the watches
concerned and wakes their streams.

Changes are coalesced in each watch's sets, so a burst of events becomes one message and a slow
agent costs memory in proportion to its node's pods, never to the number of events. An
identity's credentials are routed by interest: each stream tells the fan-out which identities
its node uses (``serve``), so a refresh wakes only the streams that push it.

The credentials themselves are published with the announcement and kept, as their wire
messages, in ``CredentialMessages`` for the streams to read — only until the cache announces
that the identity has none, which it does on release and on expiry (and they are not handed out
once expired, even before that announcement). One shared map rather than a copy per stream:
a stream that starts serving an identity needs its current credentials at once, and streams
then hold no secrets of their own to forget.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from protos import kiam_pb2
from server import metrics
from server.credentials_proto import CredentialMessages
from server.identity import AwsCredentials, RoleIdentity


@dataclass(slots=True, eq=False)
class NodeWatch:
    """One agent's subscription to its node: what changed since its stream last looked."""

    host_ip: str
    dirty_ips: set[str] = field(default_factory=set)
    dirty_identities: set[str] = field(default_factory=set)  # identity keys
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False
    # The identities the stream's node uses, as it last told the fan-out (see NodeFanout.serve).
    serving: frozenset[RoleIdentity] = frozenset()
    # The node's identities, each with how many of its IPs name a pod granted it: set by the
    # stream from the registry once (None until then), then kept by the registry's
    # ``identity_used`` announcements; and whether an identity has come or gone since the
    # stream last looked.
    uses: dict[RoleIdentity, int] | None = None
    identities_changed: bool = False

    def take(self) -> tuple[set[str], set[str]]:
        """The changed IPs and identity keys, emptied for the next round."""
        ips, identities = self.dirty_ips, self.dirty_identities
        self.dirty_ips, self.dirty_identities = set(), set()
        self.changed.clear()
        return ips, identities


class NodeFanout:
    def __init__(self, messages: CredentialMessages) -> None:
        self._messages = messages
        self._by_host: dict[str, set[NodeWatch]] = {}
        self._by_identity: dict[RoleIdentity, set[NodeWatch]] = {}
        self._closed = False

    # ---- node streams -----------------------------------------------------------------------

    def subscribe(self, host_ip: str) -> NodeWatch:
        watch = NodeWatch(host_ip, closed=self._closed)
        self._by_host.setdefault(host_ip, set()).add(watch)
        metrics.NODE_STREAMS.inc()
        return watch

    def unsubscribe(self, watch: NodeWatch) -> None:
        watches = self._by_host.get(watch.host_ip)
        if not watches or watch not in watches:
            return
        watches.discard(watch)
        if not watches:
            del self._by_host[watch.host_ip]
        self.serve(watch, ())
        metrics.NODE_STREAMS.dec()

    def serve(self, watch: NodeWatch, identities: Collection[RoleIdentity]) -> None:
        """The identities whose credentials ``watch``'s stream pushes, from now on: announcements
        for exactly these wake it."""
        new = frozenset(identities)
        old = watch.serving
        if new == old:
            return
        for identity in old - new:
            watches = self._by_identity.get(identity)
            if watches is not None:
                watches.discard(watch)
                if not watches:
                    del self._by_identity[identity]
        for identity in new - old:
            self._by_identity.setdefault(identity, set()).add(watch)
        watch.serving = new

    def streams(self, host_ip: str) -> int:
        """How many node streams are open for ``host_ip``'s agent."""
        return len(self._by_host.get(host_ip, ()))

    def credentials(self, identity: RoleIdentity) -> kiam_pb2.Credentials | None:
        """The wire message of ``identity``'s credentials as last announced; None when the cache
        holds none (not fetched yet, released, or expired)."""
        return self._messages.current(identity)

    def close(self) -> None:
        """End every node stream (at shutdown), so agents reconnect to another replica at once
        instead of waiting for the grace period to run out; streams opened later end at once."""
        self._closed = True
        for watches in self._by_host.values():
            for watch in watches:
                watch.closed = True
                watch.changed.set()

    # ---- publishers -------------------------------------------------------------------------

    @property
    def watching(self) -> bool:
        """Whether any node stream is open: without one, publishers may skip working out whom
        a change concerns."""
        return bool(self._by_host)

    def ip_changed(self, ip: str, hosts: Iterable[str]) -> None:
        """What ``ip`` names may have changed for the agents of ``hosts`` (the registry)."""
        for host in hosts:
            for watch in self._by_host.get(host, ()):
                watch.dirty_ips.add(ip)
                watch.changed.set()

    def identity_used(self, host_ip: str, identity: RoleIdentity, count: int) -> None:
        """``count`` more (or fewer) of ``host_ip``'s IPs name a pod granted ``identity`` (the
        registry): only a first use or a last one changes what the node's agent must hold."""
        for watch in self._by_host.get(host_ip, ()):
            uses = watch.uses
            if uses is None:
                continue
            held = uses.get(identity, 0) + count
            if held > 0:
                uses[identity] = held
            else:
                uses.pop(identity, None)
            if held <= 0 or held == count:
                watch.identities_changed = True
                watch.changed.set()

    def credentials_changed(self, identity: RoleIdentity, creds: AwsCredentials | None) -> None:
        """The cache now holds ``creds`` for ``identity``, or none (the cache's on_update)."""
        self._messages.published(identity, creds)
        for watch in self._by_identity.get(identity, ()):
            watch.dirty_identities.add(identity.key)
            watch.changed.set()
