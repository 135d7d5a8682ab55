"""``/latest/meta-data/iam/security-credentials/<role>``: the pod's credentials document."""

from __future__ import annotations

from aiohttp import web

from agent.lookup import PodLookup


class CredentialsHandler:
    def __init__(self, lookup: PodLookup) -> None:
        self._lookup = lookup

    async def __call__(self, request: web.Request, ip: str, role: str) -> web.Response:
        # Real IMDS serves this document as text/plain; SDKs parse it as JSON regardless.
        return web.Response(
            body=await self._lookup.credentials(ip, role), content_type="text/plain"
        )
