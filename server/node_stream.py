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
from typing import Protocol

from protos import kiam_pb2
from server.fanout import NodeFanout, NodeWatch
from server.identity import RoleIdentity
from server.pods import PodRecord
from server.policy import Grant, Reason


class ServedPods(Protocol):
    """Where the stream records each pod it hands an identity with credentials (the audit)."""

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
        # At most one message per ``linger`` seconds: a change after a quiet spell goes out at
        # once, the changes that follow it within ``linger`` wait and go out together (each
        # message costs the server far more than the changes in it; see --node-stream-linger).
        self._linger = linger
        self._clock = clock
        self._sleep = sleep

    async def updates(self) -> AsyncIterator[kiam_pb2.NodeUpdate]:
        watch = self._fanout.subscribe(self.host_ip)
        try:
            snapshot = self._snapshot(watch)
            sent = self._clock()
            yield snapshot
            del snapshot  # sent by now: the node's whole state is not held while waiting
            while True:
                await watch.changed.wait()
                if watch.closed:
                    return
                if self._linger > 0:
                    wait = sent + self._linger - self._clock()
                    if wait > 0:
                        await self._sleep(wait)  # what changes meanwhile joins this message
                        if watch.closed:
                            return
                update = self._delta(watch)
                if update is not None:
                    sent = self._clock()
                    yield update
                del update  # sent by now (see KiamService.WatchNode): not held while waiting
        finally:
            self._fanout.unsubscribe(watch)

    def _snapshot(self, watch: NodeWatch) -> kiam_pb2.NodeUpdate:
        update = kiam_pb2.NodeUpdate(reset=True, synced=True)
        for ip in self._pods.node_ips(self.host_ip):
            state = self._pod_state(ip, *self._pods.state_on_node(ip, self.host_ip))
            if state is not None:
                update.pods.append(state)
        # Counted once here; from now on the registry's announcements keep the counts.
        watch.uses = self._pods.node_identity_uses(self.host_ip)
        watch.identities_changed = True
        self._sync_credentials(watch, update, refreshed=set())
        self._record_served(update, everyone=True)
        return update

    def _delta(self, watch: NodeWatch) -> kiam_pb2.NodeUpdate | None:
        ips, refreshed = watch.take()
        update = kiam_pb2.NodeUpdate()
        served: list[tuple[PodRecord, Grant]] = []
        for ip in sorted(ips):
            pod, grant = self._pods.state_on_node(ip, self.host_ip)
            state = self._pod_state(ip, pod, grant)
            if state is None:
                update.removed_ips.append(ip)
            else:
                update.pods.append(state)
                if grant is not None and grant.identity is not None:
                    served.append((pod, grant))
        first_sent = self._sync_credentials(watch, update, refreshed=refreshed)
        # A refresh alone changes no pod's identity: its pods were recorded when the identity's
        # credentials first went out, so only a first sending looks at every pod again.
        self._record_served(update, everyone=first_sent, served=served)
        if not (
            update.pods or update.removed_ips or update.credentials or update.removed_identities
        ):
            return None
        return update

    def _pod_state(
        self, ip: str, pod: PodRecord | None, grant: Grant | None
    ) -> kiam_pb2.PodState | None:
        """The state of ``ip`` as the registry's ``state_on_node`` gave it (pod, grant)."""
        if pod is None:
            return None
        if grant is None:
            # Carries the pod's role, so the agent answers "refused: ambiguous", never "no role".
            return kiam_pb2.PodState(
                ip=ip,
                uid=pod.uid,
                role=pod.role,
                denied=f"IP {ip} is held by several active pods; podiam refuses to guess",
                reason=Reason.AMBIGUOUS_IP.value,
            )
        if grant.denial is not None:
            return kiam_pb2.PodState(
                ip=ip,
                uid=pod.uid,
                role=pod.role,
                role_arn=grant.role_arn,
                denied=grant.denial.message,
                reason=grant.denial.reason.value,
            )
        return kiam_pb2.PodState(
            ip=ip, uid=pod.uid, role=pod.role, role_arn=grant.role_arn,
            identity=grant.identity.key,
        )  # fmt: skip

    def _record_served(
        self,
        update: kiam_pb2.NodeUpdate,
        *,
        everyone: bool,
        served: Iterable[tuple[PodRecord, Grant]] = (),
    ) -> None:
        """Tell the audit which pods the agent can now serve: those in this update whose
        identity's credentials it holds (``served``: the update's pods with their grants), and
        — when credentials went out — every pod on the node (credentials may reach the agent
        after the pod did). The audit keeps one record per pod, so repeats cost a dictionary
        lookup."""
        if self._audit is None:
            return
        if everyone:
            state_on_node = self._pods.state_on_node
            served = [
                state_on_node(ip, self.host_ip) for ip in list(self._pods.node_ips(self.host_ip))
            ]
        for pod, grant in served:
            if pod is None or grant is None or grant.identity is None:
                continue
            if grant.identity.key not in self._sent:
                continue
            message = self._fanout.credentials(grant.identity)
            if message is not None:
                self._audit.pod_served(pod, grant.identity, message.access_key_id)

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
