"""``/latest/meta-data/iam/info``: the instance profile, described as the pod's role.

Tools read the account and role from here; they must see the pod's role, never the node's.
"""

from __future__ import annotations

import base64
import hashlib
import json

from agent.lookup import PodLookup
from agent.refusal import Refused
from agent.request import Request
from agent.state import NodeState
from agent.wire import Response
from runtime import imds


class InfoHandler:
    def __init__(self, lookup: PodLookup, state: NodeState) -> None:
        self._lookup = lookup
        self._state = state

    async def __call__(self, request: Request) -> Response:
        entry = await self._lookup.entry(request.ip)
        arn = entry.role_arn or (entry.role if entry.role.startswith("arn:") else "")
        if not arn:
            # Only the node stream carries the role's ARN for a short-named role.
            raise Refused(503, "no-stream", "iam/info is unavailable while the node stream is down")
        served = self._state.credentials.get(entry.identity)
        body = {
            "Code": imds.CODE_SUCCESS,
            "LastUpdated": served.last_updated if served is not None else "",
            "InstanceProfileArn": instance_profile_arn(arn),
            "InstanceProfileId": instance_profile_id(arn),
        }
        return Response.text(json.dumps(body, indent=2))


def instance_profile_arn(role_arn: str) -> str:
    """The ARN of an instance profile named after the role, in the role's account."""
    prefix, _, path = role_arn.partition(":role/")
    return f"{prefix}:instance-profile/{path}"


def instance_profile_id(role_arn: str) -> str:
    """A stable, IAM-shaped unique id ("AIPA" + 17 characters) derived from the role's ARN."""
    digest = base64.b32encode(hashlib.sha256(role_arn.encode()).digest()).decode()
    return "AIPA" + digest[:17]
