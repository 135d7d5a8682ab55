"""Every other path: proxied to the real metadata service when the allow-list permits it."""

from __future__ import annotations

from aiohttp import web

from agent.proxy import MetadataProxy
from agent.refusal import Refused


class ProxyHandler:
    def __init__(self, proxy: MetadataProxy, *, allow_pattern: str) -> None:
        self._proxy = proxy
        self._allow_pattern = allow_pattern

    async def __call__(self, request: web.Request, ip: str, path: str) -> web.Response:
        if not self._proxy.allows(path):
            raise Refused(
                404,
                "blocked-path",
                f"{path} is not served to pods: only paths matching --allow-route-regexp "
                f"({self._allow_pattern}) are proxied to the metadata service",
            )
        answer = await self._proxy.fetch(request.method, path)
        return web.Response(
            status=answer.status, body=answer.body, content_type=answer.content_type
        )
