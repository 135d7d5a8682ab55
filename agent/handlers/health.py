"""``/ping`` (the process answers) and ``/health`` (it can serve credentials; ``?deep=1`` says
in which mode: live, one-stream, stale or none)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from agent.refusal import Refused
from agent.state import Mode, NodeState


async def ping(request: web.Request, ip: str) -> web.Response:
    return web.Response(text="pong", content_type="text/plain")


class HealthHandler:
    def __init__(self, synced_once: asyncio.Event, state: NodeState) -> None:
        self._synced_once = synced_once
        self._state = state

    async def __call__(self, request: web.Request, ip: str) -> web.Response:
        if not self._synced_once.is_set():
            raise Refused(503, "not-connected", "not connected to a podiam server yet")
        if request.query.get("deep") not in ("1", "true"):
            return web.Response(text="ok", content_type="text/plain")
        # deep=1 (the readiness probe) also wants a live, synced stream of the hot path, and
        # says which mode the agent is in either way.
        mode = self._state.mode
        if mode in (Mode.LIVE, Mode.ONE_STREAM):
            return web.Response(text=f"ok: {mode.value}", content_type="text/plain")
        raise Refused(503, "no-stream", f"{mode.value}: no node stream from a server is live")
