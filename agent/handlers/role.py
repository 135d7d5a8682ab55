"""``/latest/meta-data/iam/security-credentials/``: the name of the pod's role."""

from __future__ import annotations

from aiohttp import web

from agent.lookup import PodLookup


class RoleHandler:
    def __init__(self, lookup: PodLookup) -> None:
        self._lookup = lookup

    async def __call__(self, request: web.Request, ip: str) -> web.Response:
        entry = await self._lookup.entry(ip)
        # No trailing newline: some SDKs use the body verbatim in the next path.
        return web.Response(text=entry.role_name, content_type="text/plain")
