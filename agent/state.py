"""What the agent knows about its node, as the server's node stream tells it.

This is the hot path's data: the credentials response for a pod is a dictionary lookup from
its IP to its entry, and from the entry's identity to response bytes rendered once, when the
credentials arrived. Requests for a pod the stream does not know yet wait on an event the
stream sets, never by polling.

Up to two node streams (from two server replicas) feed one merged state; when none is live the
merged state keeps serving within the stale rules (``usable_entry``, ``usable_credentials``).
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from agent import metrics, wire
from protos import kiam_pb2
from runtime import imds

if TYPE_CHECKING:
    from agent.hostroutes import HostRoutes

log = logging.getLogger(__name__)

# Without a stream, credentials are served only while they have at least this much left, so
# an SDK never receives credentials that expire before it can use them.
EXPIRY_MARGIN_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class PodEntry:
    role: str  # as annotated: short name or ARN; empty when the pod has none
    role_name: str  # what IMDS calls the role: the last path segment of the role
    role_arn: str
    identity: str  # key of its credentials; empty when it gets none
    denied: str  # why it gets none; empty when permitted
    reason: str = ""  # the server's rule that refused it ("ambiguous-ip", ...); may be empty
    uid: str = ""  # the pod's uid: token-bound answers are given only while it holds the IP


def role_name(role: str) -> str:
    """IMDS lists a role by its name alone, without account or path: ``team/reader`` and
    ``arn:aws:iam::1:role/team/reader`` are both ``reader``."""
    return role.rsplit("/", 1)[-1]


def credentials_body(creds: kiam_pb2.Credentials) -> bytes:
    """The IMDS credentials document, in the field order real IMDS uses."""
    return json.dumps(
        {
            "Code": creds.code or imds.CODE_SUCCESS,
            "LastUpdated": creds.last_updated,
            "Type": creds.type or imds.CREDENTIALS_TYPE,
            "AccessKeyId": creds.access_key_id,
            "SecretAccessKey": creds.secret_access_key,
            "Token": creds.token,
            "Expiration": creds.expiration,
        },
        indent=2,
    ).encode()


def entry_from_state(state: kiam_pb2.PodState) -> PodEntry:
    return PodEntry(
        role=state.role,
        role_name=role_name(state.role),
        role_arn=state.role_arn,
        identity=state.identity,
        denied=state.denied,
        reason=state.reason,
        uid=state.uid,
    )


class StreamView:
    """What one node stream said: its pods, its credentials, the IPs it saw removed (so that a
    deletion seen by this stream overrules another stream that has not seen it yet)."""

    def __init__(self, owner: NodeState) -> None:
        self._owner = owner
        self.pods: dict[str, PodEntry] = {}
        self.credentials: dict[str, ServedCredentials] = {}
        self.removed: set[str] = set()
        self.live = False

    def apply(self, update: kiam_pb2.NodeUpdate) -> None:
        self._owner.apply(update, view=self)

    def lost(self) -> None:
        self._owner.lost(view=self)


@dataclass(frozen=True, slots=True)
class ServedCredentials:
    """One identity's credentials as the agent serves them."""

    body: bytes  # the IMDS credentials document, rendered once when they arrived
    last_updated: str  # their LastUpdated, which iam/info also reports
    expires: float  # seconds since the epoch: stale service never serves them past this
    # The whole HTTP response (status line, headers, body), rendered once with the body: the
    # listener's hot path writes these bytes as they are (agent/wire.py).
    response: wire.Rendered

    @classmethod
    def of(cls, creds: kiam_pb2.Credentials) -> ServedCredentials:
        body = credentials_body(creds)
        return cls(body, creds.last_updated, _expires(creds), wire.render(200, body, wire.PLAIN))


def _expires(creds: kiam_pb2.Credentials) -> float:
    try:
        moment = datetime.strptime(creds.expiration, imds.TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return 0.0  # unreadable: never served without a live stream
    return moment.timestamp()


class Mode(enum.Enum):
    LIVE = "live"  # two node streams are live
    ONE_STREAM = "one-stream"  # one is
    STALE = "stale"  # none is: answering from what they last said, within the stale rules
    NONE = "none"  # none is and nothing is known


class NodeState:
    """The node's pods and credentials merged from up to two node streams, with the rules
    for answering when the streams disagree or are all gone (see docs/architecture.md,
    "Static stability")."""

    def __init__(
        self,
        *,
        routes: HostRoutes | None = None,
        stale_grace: float = 25.0,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        # Merged: what the hot path reads.
        self.pods: dict[str, PodEntry] = {}
        # identity → the credentials served: their IMDS document, LastUpdated (for iam/info)
        # and expiry (for stale service), as the freshest live stream brought them.
        self.credentials: dict[str, ServedCredentials] = {}
        self.views: list[StreamView] = []
        self._default: StreamView | None = None
        self._routes = routes
        self._route_at_confirm: dict[str, int | None] = {}  # ip → ifindex when confirmed
        # IPs dropped because their route changed: kept out until a stream speaks of them again.
        self._suspended: set[str] = set()
        self._stale_grace = stale_grace
        self._wall = wall
        self._monotonic = monotonic
        self.stale_since: float | None = None  # monotonic time the last live stream broke
        self._waiters: dict[str, set[asyncio.Event]] = {}  # ip → its requests' events
        self._publish_mode()

    # ---- the streams' side ----------------------------------------------------------------

    def view(self) -> StreamView:
        """A new stream's own view; the merged state follows every view that is live."""
        view = StreamView(self)
        self.views.append(view)
        return view

    def _view(self, view: StreamView | None) -> StreamView:
        if view is not None:
            return view
        if self._default is None:
            self._default = self.view()
        return self._default

    @property
    def live(self) -> bool:
        """Some node stream is connected and its snapshot applied."""
        return any(view.live for view in self.views)

    @property
    def mode(self) -> Mode:
        count = sum(view.live for view in self.views)
        if count >= 2:
            return Mode.LIVE
        if count == 1:
            return Mode.ONE_STREAM
        return Mode.STALE if self.pods and self.stale_since is not None else Mode.NONE

    def apply(self, update: kiam_pb2.NodeUpdate, *, view: StreamView | None = None) -> None:
        if self._routes is not None:
            # Whatever the kernel has said about routes is applied first: a pod the update
            # confirms is then judged by the routes of now, never by a view from before its
            # veth was made (nor before its predecessor's went).
            self._routes.settle()
        view = self._view(view)
        ips: set[str] = set(update.removed_ips)
        identities: set[str] = set(update.removed_identities)
        if update.reset:
            # The snapshot is this server's whole truth: whatever the view held and the
            # snapshot lacks was removed, as far as this stream knows.
            fresh = {state.ip for state in update.pods}
            ips |= view.pods.keys() | view.removed
            view.removed = (view.removed | view.pods.keys()) - fresh
            identities |= view.credentials.keys()
            view.pods.clear()
            view.credentials.clear()
        for ip in update.removed_ips:
            view.pods.pop(ip, None)
            view.removed.add(ip)
        for identity in update.removed_identities:
            view.credentials.pop(identity, None)
        for item in update.credentials:
            creds = item.credentials
            view.credentials[item.identity] = ServedCredentials.of(creds)
            identities.add(item.identity)
        for state in update.pods:
            view.pods[state.ip] = entry_from_state(state)
            view.removed.discard(state.ip)
            ips.add(state.ip)
        became_live = update.synced and not view.live
        if update.synced:
            view.live = True
        if became_live:
            self._merge_all(confirmed=ips)
        elif view.live:
            self._merge(ips, identities, confirmed=ips)
        self._publish_mode()
        self._wake()

    def lost(self, *, view: StreamView | None = None) -> None:
        """A stream broke. The others, if live, carry on alone; if none is, what they last
        said is kept for stale service (``usable_*`` decide what of it may still be served)."""
        view = self._view(view)
        was_live = view.live
        view.live = False
        view.pods.clear()
        view.credentials.clear()
        view.removed.clear()
        if was_live:
            if self.live:
                self._merge_all()
            else:
                self.stale_since = self._monotonic()
                log.warning(
                    "no node stream is live: serving %d cached pod(s) within the stale rules",
                    len(self.pods),
                )
        self._publish_mode()
        self._wake()

    def _merge_all(self, *, confirmed: AbstractSet[str] = frozenset()) -> None:
        ips = set(self.pods) | self._suspended
        identities = set(self.credentials)
        for view in self.views:
            if view.live:
                ips |= view.pods.keys()
                identities |= view.credentials.keys()
        self.stale_since = None
        self._merge(ips, identities, confirmed=confirmed)

    def _merge(self, ips: set[str], identities: set[str], *, confirmed: AbstractSet[str]) -> None:
        live = [view for view in self.views if view.live]
        for ip in ips:
            if ip in self._suspended:
                if ip not in confirmed:
                    continue  # its route changed; only a stream's word about it lifts that
                self._suspended.discard(ip)
            entry = _agreed(ip, live)
            if entry is None:
                self.pods.pop(ip, None)
                self._route_at_confirm.pop(ip, None)
            elif self.pods.get(ip) != entry:
                self.pods[ip] = entry
                self._route_at_confirm[ip] = self._route(ip)
        for identity in identities:
            best = max(
                (view.credentials[identity] for view in live if identity in view.credentials),
                key=lambda creds: creds.expires,
                default=None,
            )
            if best is None:
                self.credentials.pop(identity, None)
            else:
                self.credentials[identity] = best
        metrics.PODS_KNOWN.set(len(self.pods))

    def _route(self, ip: str) -> int | None:
        return self._routes.interface(ip) if self._routes is not None else None

    def route_changed(self, ip: str) -> None:
        """Netlink saw the IP's host route appear, vanish or move (agent/hostroutes.py)."""
        if ip not in self.pods:
            return
        confirmed = self._route_at_confirm.get(ip)
        if confirmed is None and self.live:
            # Confirmed before its route was seen (the CNI was still wiring it): the first
            # route seen while a stream is live becomes the pod's evidence.
            self._route_at_confirm[ip] = self._route(ip)
        elif self._route(ip) != confirmed:
            # The pod's veth went (or the IP is now routed elsewhere): whoever is behind the
            # IP now is not the pod the server described. Not served until a stream or the
            # server confirms it again.
            log.info("host route of %s changed: not served until the server confirms it", ip)
            self.pods.pop(ip, None)
            self._route_at_confirm.pop(ip, None)
            self._suspended.add(ip)
            metrics.PODS_KNOWN.set(len(self.pods))
            metrics.ROUTE_DROPS.inc()
            self._publish_mode()

    # ---- the requests' side ---------------------------------------------------------------

    def usable_entry(self, ip: str) -> PodEntry | None:
        """The pod's entry if it may be answered from memory now, else None."""
        entry = self.pods.get(ip)
        if entry is None or self.stale_since is None:
            return entry  # a live stream, or nothing: the common case, decided
        if not self._stale_trusted(ip):
            return None
        return entry

    def usable_credentials(self, identity: str) -> bytes | None:
        served = self.usable_served(identity)
        return served.body if served is not None else None

    def usable_served(self, identity: str) -> ServedCredentials | None:
        served = self.credentials.get(identity)
        if served is None:
            return None
        # Without a stream nobody withdraws credentials that expire: never serve those.
        if self.stale_since is not None and served.expires - self._wall() < EXPIRY_MARGIN_SECONDS:
            return None
        return served

    def _stale_trusted(self, ip: str) -> bool:
        if self._route_at_confirm.get(ip) is not None and self._route(ip) is not None:
            # Route evidence: the route is still the confirmed one (route_changed dropped the
            # entry otherwise), so the IP is still that pod's however long the outage lasts.
            return True
        assert self.stale_since is not None
        # No evidence: trust the IP only for less time than the CNI keeps an IP unused.
        return self._monotonic() - self.stale_since < self._stale_grace

    def ready(self, ip: str) -> bool:
        """Whether the stream can answer for ``ip``: a denial, a pod without a role, or a
        permitted pod whose credentials have arrived."""
        entry = self.pods.get(ip)
        if entry is None:
            return False
        return not entry.identity or entry.identity in self.credentials

    async def wait_ready(self, ip: str, seconds: float) -> bool:
        """Wait until the stream can answer for ``ip`` or it breaks, at most ``seconds``."""
        if self.ready(ip):
            return True
        # One event per waiting request, filed under its IP. After each update only the
        # waiters whose IP is now ready (or all, when no stream is live any more) are woken:
        # in a burst of new pods a thousand requests wait at once while the stream brings
        # their pods a batch at a time, and waking every one of them on every batch, for each
        # to find its pod still missing, cost the agent's one core more than answering them.
        event = asyncio.Event()
        waiters = self._waiters.setdefault(ip, set())
        waiters.add(event)
        try:
            async with asyncio.timeout(seconds):
                while not self.ready(ip) and self.live:
                    await event.wait()
                    event.clear()
        except TimeoutError:
            pass
        finally:
            waiters.discard(event)
            if not waiters and self._waiters.get(ip) is waiters:
                del self._waiters[ip]
        return self.ready(ip)

    @property
    def waiting(self) -> int:
        """Requests waiting for the stream to answer for their pod."""
        return sum(len(events) for events in self._waiters.values())

    def _wake(self) -> None:
        everyone = not self.live
        for ip, events in self._waiters.items():
            if everyone or self.ready(ip):
                for event in events:
                    event.set()

    def _publish_mode(self) -> None:
        current = self.mode
        for mode in Mode:
            metrics.MODE.labels(mode=mode.value).set(1 if mode is current else 0)
        metrics.STREAMS_LIVE.set(sum(view.live for view in self.views))
        metrics.STREAM_CONNECTED.set(1 if self.live else 0)


def _agreed(ip: str, live: list[StreamView]) -> PodEntry | None:
    """The entry every live stream agrees on, failing closed: a removal seen by any stream wins,
    and streams that describe the IP differently (one has seen a new pod, the other not yet)
    serve neither description until they agree. A stream that has not heard of the IP at all
    does not object: a new pod is served as soon as the first stream brings it."""
    agreed: PodEntry | None = None
    for view in live:
        if ip in view.removed:
            return None
        entry = view.pods.get(ip)
        if entry is None:
            continue
        if agreed is not None and entry != agreed:
            return None
        agreed = entry
    return agreed
