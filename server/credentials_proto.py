"""AwsCredentials as the kiam wire message (shared by the unary RPC and the node stream), built
once per set of credentials and forgotten with them.

Every agent asking for the same identity gets the same credentials until the next refresh, and
formatting two timestamps per call was most of the unary RPC's own work, so each message is
built once. It is kept only while the credentials cache holds exactly those credentials: the
cache's ``on_update`` (new credentials, or none when an identity is released or its credentials
expire) makes ``forget`` drop it, so no secret outlives its place in the cache.
"""

from __future__ import annotations

from protos import kiam_pb2
from server.identity import AwsCredentials, RoleIdentity, format_aws_time
from server.registry import CredentialsHolder


def build_message(creds: AwsCredentials) -> kiam_pb2.Credentials:
    return kiam_pb2.Credentials(
        code="Success",
        type="AWS-HMAC",
        access_key_id=creds.access_key_id,
        secret_access_key=creds.secret_access_key,
        token=creds.token,
        expiration=format_aws_time(creds.expiration),
        last_updated=format_aws_time(creds.last_updated),
    )


class CredentialMessages:
    """The wire message of each identity's current credentials. Callers must not modify a
    message; protobuf copies it when it is nested in another."""

    def __init__(self, holder: CredentialsHolder) -> None:
        self._holder = holder
        self._messages: dict[RoleIdentity, tuple[AwsCredentials, kiam_pb2.Credentials]] = {}

    def message(self, identity: RoleIdentity, creds: AwsCredentials) -> kiam_pb2.Credentials:
        held = self._messages.get(identity)
        if held is not None and held[0] is creds:
            return held[1]
        message = build_message(creds)
        # Remember only what the cache itself holds (and so will announce dropping): credentials
        # fetched for an identity nobody acquired are handed out once and never kept.
        if self._holder.peek(identity) is creds:
            self._messages[identity] = (creds, message)
        return message

    def forget(self, identity: RoleIdentity) -> None:
        self._messages.pop(identity, None)

    def __contains__(self, identity: object) -> bool:
        return identity in self._messages

    def __len__(self) -> int:
        return len(self._messages)
