"""The node stream: podiam's addition to the kiam protocol, and the reason the agent's hot path
is a dictionary lookup. Each agent receives the state of its own node — which pod IP holds which
permitted identity, and the credentials for those identities — as a snapshot and then as changes,
coalesced so that a burst of watch events becomes one message.

It reads the node's state from the registry and learns of changes from the node fan-out
(server/fanout.py), which also hands it the credentials the cache last announced: the stream
never asks the cache, and keeps no credentials of its own between messages.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Protocol

from protos import kiam_pb2
from server.fanout import NodeFanout, NodeWatch
from server.identity import RoleIdentity
from server.pods import PodRecord
from server.policy import Grant, Reason


class ServedPods(Protocol):
    """Where the stream records each pod it hands an identity with credentials (the audit)."""

    def recorded(self, pod: PodRecord, identity: RoleIdentity) -> bool:
        """Whether ``pod`` was recorded as served ``identity`` already."""
        ...

    def pod_served(self, pod: PodRecord, identity: RoleIdentity, access_key_id: str) -> None: ...


class NodePods(Protocol):
    """What one node's agent should hold, as the registry decides it."""

    def node_ips(self, host_ip: str) -> Iterable[str]: ...
    def node_identity_uses(self, host_ip: str) -> dict[RoleIdentity, int]: ...
    def state_on_node(self, ip: str, host_ip: str) -> tuple[PodRecord | None, Grant | None]: ...


class NodeStream:
    """Builds the messages for one agent; remembers which identities it sent credentials for
    (never the credentials), so that it sends each set once per refresh and withdraws it as soon
    as no pod on the node uses it or the cache holds none."""

    def __init__(
        self,
        *,
        pods: NodePods,
        fanout: NodeFanout,
        host_ip: str,
        audit: ServedPods | None = None,
        linger: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self._pods = pods
        self._fanout = fanout
        self._audit = audit
        self.host_ip = host_ip
        self._sent: set[str] = set()  # identity keys
        # With a linger only: what the agent holds for each IP it was sent, as (pod uid, grant),
        # to tell a change that takes an answer away (sent at once) from one that may wait;
        # the changed IPs set aside to wait; and whether the linger since the last message is
        # over.
        self._held: dict[str, tuple[str, Grant | None]] = {}
        self._waiting: set[str] = set()
        self._lingered = False
        # At most one message per ``linger`` seconds: a change after a quiet spell goes out at
        # once, the changes that follow it within ``linger`` wait and go out together (each
        # message costs the server far more than the changes in it; see --node-stream-linger).
        self._linger = linger
        self._clock = clock
        self._sleep = sleep

    async def updates(self) -> AsyncIterator[kiam_pb2.NodeUpdate]:
        watch = self._fanout.subscribe(self.host_ip)
        waking: asyncio.Future | None = None
        try:
            snapshot = self._snapshot(watch)
            sent = self._clock()
            yield snapshot
            del snapshot  # sent by now: the node's whole state is not held while waiting
            while True:
                await watch.changed.wait()
                if watch.closed:
                    return
                if self._linger > 0 and not self._lingered and self._may_wait(watch, sent):
                    # Nothing that takes an answer away: what changes until the linger is over
                    # joins this message (anything that does goes out at once, with it).
                    if waking is None:
                        waking = asyncio.ensure_future(
                            self._linger_over(watch, sent + self._linger - self._clock())
                        )
                    continue
                if waking is not None:
                    waking.cancel()
                    waking = None
                self._lingered = False
                update = self._delta(watch)
                if update is not None:
                    sent = self._clock()
                    yield update
                del update  # sent by now (see KiamService.WatchNode): not held while waiting
        finally:
            if waking is not None:
                waking.cancel()
            self._fanout.unsubscribe(watch)

    async def _linger_over(self, watch: NodeWatch, seconds: float) -> None:
        await self._sleep(seconds)
        self._lingered = True
        watch.changed.set()

    def _may_wait(self, watch: NodeWatch, sent: float) -> bool:
        """Whether what changed may wait for the linger to be over: it is not over yet, and
        nothing that changed takes an answer away from the agent — an IP it holds that now
        names another pod, no pod, several, or its pod with another grant; an identity it
        holds that no pod uses any more or that has no credentials now. (Until such a change
        reaches it, the agent would keep answering for the pod that is gone.) What may wait
        is set aside, so that each change is looked at once here."""
        if self._clock() >= sent + self._linger:
            return False
        if watch.identities_changed and self._sent:
            wanted = {identity.key for identity in watch.uses or ()}
            if not self._sent <= wanted:
                return False
        if watch.dirty_identities:
            for identity in watch.serving:
                key = identity.key
                if (
                    key in watch.dirty_identities
                    and key in self._sent
                    and self._fanout.credentials(identity) is None
                ):
                    return False
        held = self._held
        state_on_node = self._pods.state_on_node
        for ip in watch.dirty_ips:
            answer = held.get(ip)
            if answer is None:
                continue  # the agent holds nothing for it: nothing to take away
            pod, grant = state_on_node(ip, self.host_ip)
            if pod is None or (pod.uid, grant) != answer:
                return False
        self._waiting |= watch.dirty_ips
        watch.dirty_ips = set()
        watch.changed.clear()
        return True

    def _snapshot(self, watch: NodeWatch) -> kiam_pb2.NodeUpdate:
        update = kiam_pb2.NodeUpdate(reset=True, synced=True)
        state_on_node = self._pods.state_on_node
        host_ip = self.host_ip
        lingers = self._linger > 0
        states, add_state = update.pods, self._add_state
        for ip in self._pods.node_ips(host_ip):
            pod, grant = state_on_node(ip, host_ip)
            if add_state(states, ip, pod, grant) and lingers:
                self._held[ip] = (pod.uid, grant)
        # Counted once here; from now on the registry's announcements keep the counts.
        watch.uses = self._pods.node_identity_uses(host_ip)
        watch.identities_changed = True
        self._sync_credentials(watch, update, refreshed=set())
        self._record_served(everyone=True)
        return update

    def _delta(self, watch: NodeWatch) -> kiam_pb2.NodeUpdate | None:
        ips, refreshed = watch.take()
        if self._waiting:
            ips |= self._waiting
            self._waiting = set()
        update = kiam_pb2.NodeUpdate()
        served: list[tuple[PodRecord, Grant]] = []
        state_on_node = self._pods.state_on_node
        host_ip = self.host_ip
        held = self._held if self._linger > 0 else None
        states, add_state = update.pods, self._add_state
        for ip in sorted(ips):
            pod, grant = state_on_node(ip, host_ip)
            if not add_state(states, ip, pod, grant):
                update.removed_ips.append(ip)
                if held is not None:
                    held.pop(ip, None)
            else:
                if grant is not None and grant.identity is not None:
                    served.append((pod, grant))
                if held is not None:
                    held[ip] = (pod.uid, grant)
        first_sent = self._sync_credentials(watch, update, refreshed=refreshed)
        # A refresh alone changes no pod's identity: its pods were recorded when the identity's
        # credentials first went out, so only a first sending looks at every pod again.
        self._record_served(everyone=first_sent, served=served)
        if not (
            update.pods or update.removed_ips or update.credentials or update.removed_identities
        ):
            return None
        return update

    @staticmethod
    def _add_state(states: Any, ip: str, pod: PodRecord | None, grant: Grant | None) -> bool:
        """Add to ``states`` (an update's ``pods``) the state of ``ip`` as the registry's
        ``state_on_node`` gave it (pod, grant), built in place (``add``, not a message
        appended, which would be copied); False when no pod of the node has ``ip``."""
        if pod is None:
            return False
        if grant is None:
            # Carries the pod's role, so the agent answers "refused: ambiguous", never "no role".
            states.add(
                ip=ip,
                uid=pod.uid,
                role=pod.role,
                denied=f"IP {ip} is held by several active pods; podiam refuses to guess",
                reason=Reason.AMBIGUOUS_IP.value,
            )
        elif grant.denial is not None:
            states.add(
                ip=ip,
                uid=pod.uid,
                role=pod.role,
                role_arn=grant.role_arn,
                denied=grant.denial.message,
                reason=grant.denial.reason.value,
            )
        else:
            states.add(
                ip=ip, uid=pod.uid, role=pod.role, role_arn=grant.role_arn,
                identity=grant.identity.key,
            )  # fmt: skip
        return True

    def _record_served(
        self, *, everyone: bool, served: Iterable[tuple[PodRecord, Grant]] = ()
    ) -> None:
        """Tell the audit which pods the agent can now serve: those just sent whose identity's
        credentials it holds (``served``: the update's pods with their grants), and — when
        credentials went out — every pod on the node (credentials may reach the agent after
        the pod did). The audit keeps one record per pod: a pod it has recorded with that
        identity costs a dictionary lookup, before the credentials are looked up."""
        audit = self._audit
        if audit is None:
            return
        if everyone:
            state_on_node = self._pods.state_on_node
            served = [
                state_on_node(ip, self.host_ip) for ip in list(self._pods.node_ips(self.host_ip))
            ]
        sent = self._sent
        credentials = self._fanout.credentials
        for pod, grant in served:
            if pod is None or grant is None:
                continue
            identity = grant.identity
            if identity is None or identity.key not in sent or audit.recorded(pod, identity):
                continue
            message = credentials(identity)
            if message is not None:
                audit.pod_served(pod, identity, message.access_key_id)

    def _sync_credentials(
        self, watch: NodeWatch, update: kiam_pb2.NodeUpdate, *, refreshed: set[str]
    ) -> bool:
        """Add to ``update`` the credentials the agent lacks or that were refreshed, and the
        identities it should drop; whether any identity's credentials go out for the first
        time."""
        changed = watch.identities_changed
        if not changed and not refreshed:
            # Neither the node's identities nor any credentials changed: nothing to send (an
            # identity still without credentials is announced, as refreshed, when it has some).
            return False
        watch.identities_changed = False
        identities = watch.uses or {}
        if changed:
            # From here on, every announcement for these identities wakes this stream: any
            # that came before is in what the fan-out hands out below.
            self._fanout.serve(watch, identities.keys())
        wanted = {identity.key: identity for identity in identities}
        first_sent = False
        for key in sorted(self._sent - wanted.keys()):
            self._sent.discard(key)
            update.removed_identities.append(key)
        for key, identity in wanted.items():
            if key in self._sent and key not in refreshed:
                continue
            message = self._fanout.credentials(identity)
            if message is None:
                if key in self._sent:
                    self._sent.discard(key)
                    update.removed_identities.append(key)
                continue
            if key not in self._sent:
                first_sent = True
                self._sent.add(key)
            update.credentials.append(
                kiam_pb2.IdentityCredentials(identity=key, credentials=message)
            )
        return first_sent
