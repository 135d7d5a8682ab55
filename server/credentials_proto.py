"""AwsCredentials as the kiam wire message (shared by the unary RPC and the node stream)."""

from __future__ import annotations

import functools

from protos import kiam_pb2
from server.identity import AwsCredentials, format_aws_time


# Every agent asking for the same identity gets the same credentials until the next refresh:
# build each message once (formatting two timestamps per call was most of the unary RPC's own
# work). Callers must not modify the message; protobuf copies it when it is nested in another.
@functools.lru_cache(maxsize=1024)
def credentials_message(creds: AwsCredentials) -> kiam_pb2.Credentials:
    return kiam_pb2.Credentials(
        code="Success",
        type="AWS-HMAC",
        access_key_id=creds.access_key_id,
        secret_access_key=creds.secret_access_key,
        token=creds.token,
        expiration=format_aws_time(creds.expiration),
        last_updated=format_aws_time(creds.last_updated),
    )
