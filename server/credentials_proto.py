"""AwsCredentials as the kiam wire message (shared by the unary RPC and the node stream)."""

from __future__ import annotations

from protos import kiam_pb2
from server.identity import AwsCredentials, format_aws_time


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
