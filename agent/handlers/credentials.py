"""``/latest/meta-data/iam/security-credentials/<role>``: the pod's credentials document."""

from __future__ import annotations

from agent import wire
from agent.lookup import PodLookup
from agent.request import Request


class CredentialsHandler:
    def __init__(self, lookup: PodLookup) -> None:
        self._lookup = lookup

    async def __call__(self, request: Request, role: str) -> wire.Response | wire.Rendered:
        # The listener answered from memory before coming here if it could (MetadataRoutes.
        # immediate); a HEAD, or a pod the stream does not know yet, comes this way.
        served = self._lookup.known_served(request.ip, role)
        if served is not None:
            return served.response
        body = await self._lookup.credentials(request.ip, role)
        # Real IMDS serves this document as text/plain; SDKs parse it as JSON regardless.
        return wire.Response(200, body, wire.PLAIN)
