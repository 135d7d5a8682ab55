"""``/ping`` (the process answers) and ``/health`` (it can serve credentials)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from agent.refusal import Refused
from agent.state import NodeState


async def ping(request: web.Request, ip: str) -> web.Response:
    return web.Response(text="pong", content_type="text/plain")


class HealthHandler:
    def __init__(self, synced_once: asyncio.Event, state: NodeState) -> None:
        self._synced_once = synced_once
        self._state = state

    async def __call__(self, request: web.Request, ip: str) -> web.Response:
        if not self._synced_once.is_set():
            raise Refused(503, "not-connected", "not connected to a podiam server yet")
        # deep=1 (the readiness probe) also wants the live, synced stream of the hot path.
        if request.query.get("deep") in ("1", "true") and not self._state.live:
            raise Refused(503, "no-stream", "the node stream from the server is down")
        return web.Response(text="ok", content_type="text/plain")
