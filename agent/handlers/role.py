"""``/latest/meta-data/iam/security-credentials/``: the name of the pod's role."""

from __future__ import annotations

from agent.lookup import PodLookup
from agent.request import Request
from agent.wire import Response


class RoleHandler:
    def __init__(self, lookup: PodLookup) -> None:
        self._lookup = lookup

    async def __call__(self, request: Request) -> Response:
        entry = await self._lookup.entry(request.ip)
        # No trailing newline: some SDKs use the body verbatim in the next path.
        return Response.text(entry.role_name)
