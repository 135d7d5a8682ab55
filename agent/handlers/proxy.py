"""Every other path: proxied to the real metadata service when the allow-list permits it."""

from __future__ import annotations

from agent.proxy import MetadataProxy
from agent.refusal import Refused
from agent.request import Request
from agent.wire import Response


class ProxyHandler:
    def __init__(self, proxy: MetadataProxy, *, allow_pattern: str) -> None:
        self._proxy = proxy
        self._allow_pattern = allow_pattern

    async def __call__(self, request: Request, path: str) -> Response:
        if not self._proxy.allows(path):
            raise Refused(
                404,
                "blocked-path",
                f"{path} is not served to pods: only paths matching --allow-route-regexp "
                f"({self._allow_pattern}) are proxied to the metadata service",
            )
        answer = await self._proxy.fetch(request.method, path)
        return Response(answer.status, answer.body, answer.content_type)
