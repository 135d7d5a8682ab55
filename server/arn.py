"""Role ARN resolution: turns what a pod annotates (a short name under the base ARN, or a full
ARN) into the ARN that STS needs, and finds the base ARN from the node's instance profile.

Role annotations are written by namespace admins, who may be hostile: every role is validated
as IAM defines role names and paths, so that no spelling can name a role other than the one it
appears to (``app-x/../admin`` is refused, never served as ``admin``) or make the namespace's
``permitted`` pattern match something it was not meant to.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass

import aiohttp

from runtime import imds

# arn:<partition>:iam::<account>:role/<path><name>; partitions include aws-cn, aws-us-gov and
# the isolated aws-iso*. What follows "role" is checked by _split_path_and_name.
_PARTITION_ACCOUNT = r"^arn:(aws|aws-cn|aws-us-gov|aws-iso(?:-[a-z])?):iam::(\d{12}):"
_ROLE_ARN = re.compile(_PARTITION_ACCOUNT + r"role(/.*)$", re.DOTALL)
_PROFILE_ARN = re.compile(_PARTITION_ACCOUNT + r"instance-profile/")
# IAM: a role name is 1-64 of these (ASCII word characters and +=,.@-).
_ROLE_NAME = re.compile(r"[\w+=,.@-]{1,64}", re.ASCII)
# IAM: a path is "/" or "/segment/.../", at most 512 characters of printable ASCII (U+0021 to
# U+007E); podiam also refuses "." and ".." segments, which would read as directory steps.
_PATH_SEGMENT = re.compile(r"[\x21-\x2e\x30-\x7e]+")
PATH_MAX = 512
ACCOUNT = re.compile(r"\d{12}")
# Role spellings remembered by RoleResolver, and the longest remembered: a valid role ARN is
# under 700 characters, so longer spellings are refused afresh rather than kept.
_REMEMBER = 16384
_REMEMBER_CHARS = 1024


class ArnError(ValueError):
    """A role or base ARN that cannot be used; the message says which and why."""


def quoted(value: str, limit: int = 100) -> str:
    """``value`` for a message, log line or Event: annotations may be up to 256 KiB, and a
    hostile one must not flood them."""
    if len(value) <= limit:
        return repr(value)
    return repr(value[:limit]) + f"… ({len(value)} characters)"


@dataclass(frozen=True, slots=True)
class RoleArn:
    """A role ARN taken apart, after validation."""

    partition: str
    account: str
    path: str  # "/" or "/seg/.../"
    name: str

    def __str__(self) -> str:
        return f"arn:{self.partition}:iam::{self.account}:role{self.path}{self.name}"


def parse_role_arn(value: str) -> RoleArn:
    """Validate a full role ARN; ArnError says what is wrong with it."""
    match = _ROLE_ARN.match(value)
    if not match:
        raise ArnError(
            f"{quoted(value)} is not an IAM role ARN (arn:<partition>:iam::<12-digit account>:role/"
            "[path/]name)"
        )
    partition, account, rest = match.groups()
    path, name = _split_path_and_name(value, rest)
    return RoleArn(partition, account, path, name)


def is_role_arn(value: str) -> bool:
    try:
        parse_role_arn(value)
    except ArnError:
        return False
    return True


def _split_path_and_name(role: str, rest: str) -> tuple[str, str]:
    """``/seg/.../name`` as IAM's (path, name), or ArnError naming the rule that ``role``
    breaks."""
    *segments, name = rest.split("/")[1:]
    for segment in segments:
        _check_segment(role, segment)
    path = "/" + "".join(segment + "/" for segment in segments)
    if len(path) > PATH_MAX:
        raise ArnError(f"role {quoted(role)}: its path is longer than IAM's {PATH_MAX} characters")
    if name in (".", ".."):
        _check_segment(role, name)  # refused like a "." or ".." segment, for the same reason
    if not _ROLE_NAME.fullmatch(name):
        raise ArnError(
            f"role {quoted(role)}: {quoted(name)} is not an IAM role name "
            "(1 to 64 ASCII letters, digits and +=,.@_-)"
        )
    return path, name


def _check_segment(role: str, segment: str) -> None:
    if not segment:
        raise ArnError(f"role {quoted(role)}: its path has an empty segment ('//')")
    if segment in (".", ".."):
        raise ArnError(
            f"role {quoted(role)}: path segment {segment!r} is not allowed (a role path is not a "
            "directory: '.' and '..' would name another role than the one written)"
        )
    if not _PATH_SEGMENT.fullmatch(segment):
        raise ArnError(
            f"role {quoted(role)}: path segment {quoted(segment)} has characters IAM does not "
            "allow in a path (printable ASCII only, no spaces)"
        )


def normalise_base_arn(value: str) -> str:
    """Validate a ``--role-base-arn`` such as ``arn:aws:iam::123456789012:role/`` (the trailing
    slash is optional on the command line) and return it with the slash."""
    candidate = value if value.endswith("/") else value + "/"
    match = _ROLE_ARN.match(candidate)
    error = (
        f"role base ARN {quoted(value)} is not of the form arn:aws:iam::123456789012:role/[path/]"
    )
    if not match:
        raise ArnError(error)
    for segment in match.group(3).split("/")[1:-1]:
        try:
            _check_segment(value, segment)
        except ArnError as problem:
            raise ArnError(f"{error}: {problem}") from None
    if len(match.group(3)) > PATH_MAX:
        raise ArnError(f"{error}: its path is longer than IAM's {PATH_MAX} characters")
    return candidate


class RoleResolver:
    """Maps a pod's role annotation to a role ARN, and back to the name policy matches on."""

    def __init__(self, base_arn: str) -> None:
        self.base_arn = normalise_base_arn(base_arn)
        match = _ROLE_ARN.match(self.base_arn)
        self.partition, self.account, self._base_path = match.groups()
        # Thousands of pods share a few roles: validate each spelling once.
        self._resolved: dict[str, str | ArnError] = {}

    def resolve(self, role: str) -> str:
        """The ARN for an annotation value; raises ArnError for values that are neither a valid
        role ARN nor a valid role name under the base ARN's path."""
        if len(role) > _REMEMBER_CHARS:
            return self._resolve(role)
        resolved = self._resolved.get(role)
        if resolved is None:
            try:
                resolved = self._resolve(role)
            except ArnError as error:
                resolved = error
            if len(self._resolved) >= _REMEMBER:  # spellings are pod input: stay bounded
                self._resolved.clear()
            self._resolved[role] = resolved
        if isinstance(resolved, ArnError):
            raise ArnError(*resolved.args)
        return resolved

    def _resolve(self, role: str) -> str:
        role = role.strip()
        if role.startswith("arn:"):
            return sys.intern(str(parse_role_arn(role)))
        # kiam accepted "/name" as well as "name"; both mean a role under the base ARN.
        relative = role[1:] if role.startswith("/") else role
        if not relative:
            raise ArnError(f"role {quoted(role)} names no role")
        _split_path_and_name(role, self._base_path + relative)
        # Keep one copy of each ARN, however many pods hold it.
        return sys.intern(self.base_arn + relative)

    @staticmethod
    def location(role_arn: str) -> tuple[str, str]:
        """(partition, account) of an ARN that ``resolve`` returned."""
        _arn, partition, _iam, _region, account, _rest = role_arn.split(":", 5)
        return partition, account

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
                base + imds.TOKEN_PATH, headers={imds.TOKEN_TTL_HEADER: "60"}
            ) as response:
                if response.status == 200:
                    headers[imds.TOKEN_HEADER] = await response.text()
            async with http.get(base + imds.INFO_PATH, headers=headers) as response:
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
