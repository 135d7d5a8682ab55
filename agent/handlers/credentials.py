"""``/latest/meta-data/iam/security-credentials/<role>``: the pod's credentials document."""

from __future__ import annotations

from aiohttp import web

from agent.lookup import PodLookup


class CredentialsHandler:
    def __init__(self, lookup: PodLookup) -> None:
        self._lookup = lookup

    async def __call__(self, request: web.Request, ip: str, role: str) -> web.Response:
        body = self._lookup.known_credentials(ip, role)  # the hot path: no await at all
        if body is None:
            body = await self._lookup.credentials(ip, role)
        # Real IMDS serves this document as text/plain; SDKs parse it as JSON regardless.
        return web.Response(body=body, content_type="text/plain")
