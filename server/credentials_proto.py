"""AwsCredentials as the kiam wire message (shared by the unary RPC and the node stream), built
once per set of credentials and forgotten with them.

Every agent asking for the same identity gets the same credentials until the next refresh, and
formatting two timestamps per call was most of the unary RPC's own work, so each message is
built once — and serialized once, for the unary RPC, which answers with those bytes as they are
(server/service.py: its handler is registered without a response serializer).

``CredentialMessages`` is fed by what the credentials cache announces (through the node fan-out,
server/fanout.py): new credentials replace the identity's message and bytes, and "none" — the
identity was released, or its credentials expired — drops both. So it holds exactly the
credentials the cache holds, and no secret outlives its place in the cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from protos import kiam_pb2
from runtime.imds import CODE_SUCCESS, CREDENTIALS_TYPE
from server.identity import AwsCredentials, RoleIdentity, format_aws_time


def build_message(creds: AwsCredentials) -> kiam_pb2.Credentials:
    return kiam_pb2.Credentials(
        code=CODE_SUCCESS,
        type=CREDENTIALS_TYPE,
        access_key_id=creds.access_key_id,
        secret_access_key=creds.secret_access_key,
        token=creds.token,
        expiration=format_aws_time(creds.expiration),
        last_updated=format_aws_time(creds.last_updated),
    )


@dataclass(slots=True, eq=False)
class _Held:
    creds: AwsCredentials
    built: kiam_pb2.Credentials | None = None
    wire: bytes | None = None  # ``built`` serialized, for the unary RPC
    # The expiration as a POSIX time: read for every pod a node stream serves, where building
    # an aware datetime for "now" was a measurable share of the stream's work.
    expires_at: float = field(init=False)

    def __post_init__(self) -> None:
        self.expires_at = self.creds.expiration.timestamp()

    def message(self) -> kiam_pb2.Credentials:
        if self.built is None:
            self.built = build_message(self.creds)
        return self.built

    def serialized(self) -> bytes:
        if self.wire is None:
            self.wire = self.message().SerializeToString()
        return self.wire


class CredentialMessages:
    """The wire message of each held identity's current credentials. Callers must not modify a
    message; protobuf copies it when it is nested in another."""

    def __init__(self) -> None:
        self._held: dict[RoleIdentity, _Held] = {}

    def published(self, identity: RoleIdentity, creds: AwsCredentials | None) -> None:
        """The cache holds ``creds`` for ``identity`` from now on, or none."""
        if creds is None:
            self._held.pop(identity, None)
        else:
            # Built on first use: with no agent connected yet (or per-pod session names and
            # thousands of identities) most would otherwise be built for nobody.
            self._held[identity] = _Held(creds)

    def current(self, identity: RoleIdentity) -> kiam_pb2.Credentials | None:
        """The message of the credentials the cache holds for ``identity``, if any."""
        held = self._held.get(identity)
        # The cache announces expiry when its refresher next wakes; never hand out the
        # credentials in between (the cache's own lookups refuse them as well).
        if held is None or time.time() >= held.expires_at:
            return None
        return held.message()

    def message(self, identity: RoleIdentity, creds: AwsCredentials) -> kiam_pb2.Credentials:
        """``creds`` as a message: the one kept when they are the held credentials, else one
        built for this call alone (credentials fetched for an identity nobody acquired are
        handed out once and never kept)."""
        held = self._kept(identity, creds)
        return held.message() if held is not None else build_message(creds)

    def serialized(self, identity: RoleIdentity, creds: AwsCredentials) -> bytes:
        """``message(identity, creds)`` serialized: the bytes the unary RPC answers with, kept
        with the message (and forgotten with it) when ``creds`` are the held credentials, so
        a call for held credentials serializes nothing."""
        held = self._kept(identity, creds)
        return held.serialized() if held is not None else build_message(creds).SerializeToString()

    def _kept(self, identity: RoleIdentity, creds: AwsCredentials) -> _Held | None:
        """What is kept for ``identity`` when ``creds`` are its held credentials, else None."""
        held = self._held.get(identity)
        return held if held is not None and held.creds is creds else None

    def clear(self) -> None:
        self._held.clear()

    def __contains__(self, identity: object) -> bool:
        """Whether a message is kept for ``identity`` (built, for the credentials held now)."""
        held = self._held.get(identity)  # type: ignore[call-overload]
        return held is not None and held.built is not None

    def __len__(self) -> int:
        """How many messages are kept."""
        return sum(held.built is not None for held in self._held.values())
