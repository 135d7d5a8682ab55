"""What the agent knows about its node, as the server's node stream tells it.

This is the hot path's data: the credentials response for a pod is a dictionary lookup from
its IP to its entry, and from the entry's identity to response bytes rendered once, when the
credentials arrived. Requests for a pod the stream does not know yet wait on an event the
stream sets, never by polling.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from agent import metrics
from protos import kiam_pb2
from runtime import imds


@dataclass(frozen=True, slots=True)
class PodEntry:
    role: str  # as annotated: short name or ARN; empty when the pod has none
    role_name: str  # what IMDS calls the role: the last path segment of the role
    role_arn: str
    identity: str  # key of its credentials; empty when it gets none
    denied: str  # why it gets none; empty when permitted
    reason: str = ""  # the server's rule that refused it ("ambiguous-ip", ...); may be empty


@dataclass(frozen=True, slots=True)
class ServedCredentials:
    """One identity's credentials as the agent serves them."""

    body: bytes  # the IMDS credentials document, rendered once when they arrived
    last_updated: str  # their LastUpdated, which iam/info also reports


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
    )


class NodeState:
    def __init__(self) -> None:
        self.pods: dict[str, PodEntry] = {}
        self.credentials: dict[str, ServedCredentials] = {}  # by identity
        self.live = False  # the stream is connected and its snapshot applied
        self._waiters: set[asyncio.Event] = set()

    def apply(self, update: kiam_pb2.NodeUpdate) -> None:
        if update.reset:
            self.pods.clear()
            self.credentials.clear()
        for ip in update.removed_ips:
            self.pods.pop(ip, None)
        for identity in update.removed_identities:
            self.credentials.pop(identity, None)
        for item in update.credentials:
            self.credentials[item.identity] = ServedCredentials(
                body=credentials_body(item.credentials),
                last_updated=item.credentials.last_updated,
            )
        for state in update.pods:
            self.pods[state.ip] = entry_from_state(state)
        if update.synced:
            self.live = True
        metrics.PODS_KNOWN.set(len(self.pods))
        self._wake()

    def lost(self) -> None:
        """The stream broke: what it said may be stale (a deleted pod's IP may have been
        reused meanwhile), so forget all of it and let requests go to the server."""
        self.live = False
        self.pods.clear()
        self.credentials.clear()
        metrics.PODS_KNOWN.set(0)
        self._wake()

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
        # One event per waiting request, all set on every update: waiters are few (pods
        # that have just started), updates are batched, and each waiter re-checks its own IP.
        event = asyncio.Event()
        self._waiters.add(event)
        try:
            async with asyncio.timeout(seconds):
                while not self.ready(ip) and self.live:
                    await event.wait()
                    event.clear()
        except TimeoutError:
            pass
        finally:
            self._waiters.discard(event)
        return self.ready(ip)

    @property
    def waiting(self) -> int:
        """Requests waiting for the stream to answer for their pod."""
        return len(self._waiters)

    def _wake(self) -> None:
        for event in self._waiters:
            event.set()
