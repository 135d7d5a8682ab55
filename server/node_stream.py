"""The node stream: podiam's addition to the kiam protocol, and the reason the agent's hot path
is a dictionary lookup. Each agent receives the state of its own node — which pod IP holds which
permitted identity, and the credentials for those identities — as a snapshot and then as changes,
coalesced so that a burst of watch events becomes one message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from protos import kiam_pb2
from server.credentials_proto import CredentialMessages
from server.identity import RoleIdentity
from server.policy import Reason
from server.registry import CredentialsHolder, NodeWatch, Registry


class NodeStream:
    """Builds the messages for one agent; remembers which credentials it sent, so that it sends
    each set once per refresh and withdraws it as soon as no pod on the node uses it."""

    def __init__(
        self,
        registry: Registry,
        credentials: CredentialsHolder,
        messages: CredentialMessages,
        host_ip: str,
    ) -> None:
        self._registry = registry
        self._credentials = credentials
        self._messages = messages
        self.host_ip = host_ip
        self._sent: dict[str, RoleIdentity] = {}

    async def updates(self) -> AsyncIterator[kiam_pb2.NodeUpdate]:
        watch = self._registry.subscribe(self.host_ip)
        try:
            yield self._snapshot()
            while True:
                await watch.changed.wait()
                if watch.closed:
                    return
                update = self._delta(watch)
                if update is not None:
                    yield update
        finally:
            self._registry.unsubscribe(watch)

    def _snapshot(self) -> kiam_pb2.NodeUpdate:
        update = kiam_pb2.NodeUpdate(reset=True, synced=True)
        for ip in self._registry.node_ips(self.host_ip):
            state = self._pod_state(ip)
            if state is not None:
                update.pods.append(state)
        self._sync_credentials(update, refreshed=set())
        return update

    def _delta(self, watch: NodeWatch) -> kiam_pb2.NodeUpdate | None:
        ips, refreshed = watch.take()
        update = kiam_pb2.NodeUpdate()
        for ip in sorted(ips):
            state = self._pod_state(ip)
            if state is None:
                update.removed_ips.append(ip)
            else:
                update.pods.append(state)
        self._sync_credentials(update, refreshed=refreshed)
        if not (
            update.pods or update.removed_ips or update.credentials or update.removed_identities
        ):
            return None
        return update

    def _pod_state(self, ip: str) -> kiam_pb2.PodState | None:
        pod, grant = self._registry.state_on_node(ip, self.host_ip)
        if pod is None:
            return None
        if grant is None:
            # Carries the pod's role, so the agent answers "refused: ambiguous", never "no role".
            return kiam_pb2.PodState(
                ip=ip,
                role=pod.role,
                denied=f"IP {ip} is held by several active pods; podiam refuses to guess",
                reason=Reason.AMBIGUOUS_IP.value,
            )
        if grant.denial is not None:
            return kiam_pb2.PodState(
                ip=ip,
                role=pod.role,
                role_arn=grant.role_arn,
                denied=grant.denial.message,
                reason=grant.denial.reason.value,
            )
        return kiam_pb2.PodState(
            ip=ip, role=pod.role, role_arn=grant.role_arn, identity=grant.identity.key
        )

    def _sync_credentials(self, update: kiam_pb2.NodeUpdate, *, refreshed: set[str]) -> None:
        identities = self._registry.node_identities(self.host_ip)
        wanted = {identity.key: identity for identity in identities}
        for key in list(self._sent):
            if key not in wanted:
                del self._sent[key]
                update.removed_identities.append(key)
        for key, identity in wanted.items():
            if key in self._sent and key not in refreshed:
                continue
            creds = self._credentials.peek(identity)
            if creds is None:
                if self._sent.pop(key, None) is not None:
                    update.removed_identities.append(key)
                continue
            self._sent[key] = identity
            update.credentials.append(
                kiam_pb2.IdentityCredentials(
                    identity=key, credentials=self._messages.message(identity, creds)
                )
            )
