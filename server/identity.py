"""Values shared by the STS gateway, the credentials cache and the gRPC service."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from runtime.imds import TIME_FORMAT as AWS_TIME_FORMAT

# botocore treats credentials with less than about 25 minutes left as expiring and refreshes them
# on every call, so podiam never hands out credentials with less than this left while fresher
# ones can be had (the cache's rule), and refuses flags that would make it (the server's config).
MIN_REMAINING = timedelta(minutes=30)


def format_aws_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(AWS_TIME_FORMAT)


@dataclass(frozen=True, slots=True)
class RoleIdentity:
    """Everything that makes two AssumeRole calls interchangeable: pods that share an identity
    share one set of credentials."""

    role_arn: str
    session_name: str
    external_id: str = ""
    # STS session tags, sorted by key: part of the identity, since STS binds them to the session.
    tags: tuple[tuple[str, str], ...] = ()
    # An opaque, stable name for this identity on the wire (the node stream), so that agents
    # never see external ids and keys stay short.
    key: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        fields = [self.role_arn, self.session_name, self.external_id]
        fields.extend(f"{key}={value}" for key, value in self.tags)
        digest = hashlib.sha256("\0".join(fields).encode()).hexdigest()
        object.__setattr__(self, "key", digest[:24])

    def __hash__(self) -> int:
        # The key is made of every compared field, and a string keeps its hash: the one the
        # dataclass would make hashes the fields' tuple on every lookup, and identities are
        # looked up several times per watch event (cache, fan-out, credential messages).
        return hash(self.key)


@dataclass(frozen=True, slots=True)
class AwsCredentials:
    access_key_id: str
    secret_access_key: str
    token: str
    # Both timezone-aware UTC, truncated to whole seconds.
    expiration: datetime
    last_updated: datetime

    def seconds_left(self, now: datetime | None = None) -> float:
        return (self.expiration - (now or datetime.now(UTC))).total_seconds()

    def __repr__(self) -> str:
        # Never let a secret reach a log line through repr().
        return (
            f"AwsCredentials(access_key_id={self.access_key_id[:4]}…, "
            f"expiration={format_aws_time(self.expiration)})"
        )
