"""Role ARN resolution: turns what a pod annotates (a short name under the base ARN, or a full
ARN) into the ARN that STS needs, and finds the base ARN from the node's instance profile."""

from __future__ import annotations

import json
import re
import sys

import aiohttp

# arn:<partition>:iam::<account>:role/<optional path/>; partitions include aws-cn, aws-us-gov
# and the isolated aws-iso*.
_PARTITION_ACCOUNT = r"^arn:(aws|aws-cn|aws-us-gov|aws-iso(?:-[a-z])?):iam::(\d{12}):"
_ROLE_ARN = re.compile(_PARTITION_ACCOUNT + r"role/(.+)$")
_BASE_ARN = re.compile(_PARTITION_ACCOUNT + r"role/(.*/)?$")
_PROFILE_ARN = re.compile(_PARTITION_ACCOUNT + r"instance-profile/")
# IAM role names (and path segments) allow these characters only.
_ROLE_NAME = re.compile(r"^[\w+=,.@/-]{1,512}$", re.ASCII)


class ArnError(ValueError):
    """A role or base ARN that cannot be used; the message says which and why."""


def is_role_arn(value: str) -> bool:
    return bool(_ROLE_ARN.match(value))


def normalise_base_arn(value: str) -> str:
    """Validate a ``--role-base-arn`` such as ``arn:aws:iam::123456789012:role/`` (the trailing
    slash is optional on the command line) and return it with the slash."""
    candidate = value if value.endswith("/") else value + "/"
    if not _BASE_ARN.match(candidate):
        raise ArnError(
            f"role base ARN {value!r} is not of the form arn:aws:iam::123456789012:role/[path/]"
        )
    return candidate


class RoleResolver:
    """Maps a pod's role annotation to a role ARN, and back to the name policy matches on."""

    def __init__(self, base_arn: str) -> None:
        self.base_arn = normalise_base_arn(base_arn)

    def resolve(self, role: str) -> str:
        """The ARN for an annotation value; raises ArnError for values that are neither a valid
        role ARN nor a valid role name."""
        role = role.strip()
        if role.startswith("arn:"):
            if not _ROLE_ARN.match(role):
                raise ArnError(f"{role!r} is not a valid IAM role ARN")
            return role
        # kiam accepted "/name" as well as "name"; both mean a role under the base ARN.
        name = role.lstrip("/")
        if not name or not _ROLE_NAME.match(name) or "//" in name:
            raise ArnError(f"{role!r} is not a valid IAM role name")
        # Thousands of pods share a few roles: keep one copy of each ARN.
        return sys.intern(self.base_arn + name)

    def short_name(self, role_arn: str) -> str | None:
        """The name under the base ARN, or None when the role lies elsewhere (another account
        or path)."""
        if role_arn.startswith(self.base_arn):
            return role_arn[len(self.base_arn) :]
        return None


def base_arn_from_instance_profile(profile_arn: str) -> str:
    match = _PROFILE_ARN.match(profile_arn)
    if not match:
        raise ArnError(f"instance profile ARN {profile_arn!r} is not recognised")
    partition, account = match.groups()
    return f"arn:{partition}:iam::{account}:role/"


async def detect_base_arn(metadata_endpoint: str, *, timeout_seconds: float = 5.0) -> str:
    """Read the node's instance profile from the metadata service (IMDSv2 when it answers, v1
    otherwise) and derive the base ARN of roles in the same account and partition."""
    base = metadata_endpoint.rstrip("/")
    client_timeout = aiohttp.ClientTimeout(total=timeout_seconds)
    try:
        async with aiohttp.ClientSession(timeout=client_timeout) as http:
            headers = {}
            async with http.put(
                f"{base}/latest/api/token",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"},
            ) as response:
                if response.status == 200:
                    headers["X-aws-ec2-metadata-token"] = await response.text()
            async with http.get(f"{base}/latest/meta-data/iam/info", headers=headers) as response:
                if response.status != 200:
                    raise ArnError(
                        f"metadata service {base} answered HTTP {response.status} for iam/info"
                    )
                info = json.loads(await response.text())
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as error:
        raise ArnError(f"cannot read the instance profile from {base}: {error!r}") from error
    profile = info.get("InstanceProfileArn") if isinstance(info, dict) else None
    if not isinstance(profile, str):
        raise ArnError(f"metadata service {base} returned no InstanceProfileArn")
    return base_arn_from_instance_profile(profile)
