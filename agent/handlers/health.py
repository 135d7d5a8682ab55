"""``/ping`` (the process answers) and ``/health`` (it can serve credentials; ``?deep=1`` says
in which mode: live, one-stream, stale or none)."""

from __future__ import annotations

import asyncio

from agent.refusal import Refused
from agent.request import Request
from agent.state import Mode, NodeState
from agent.wire import Response


async def ping(request: Request) -> Response:
    return Response.text("pong")


class HealthHandler:
    def __init__(self, synced_once: asyncio.Event, state: NodeState) -> None:
        self._synced_once = synced_once
        self._state = state

    async def __call__(self, request: Request) -> Response:
        if not self._synced_once.is_set():
            raise Refused(503, "not-connected", "not connected to a podiam server yet")
        if request.query_value("deep") not in ("1", "true"):
            return Response.text("ok")
        # deep=1 (the readiness probe) also wants a live, synced stream of the hot path, and
        # says which mode the agent is in either way.
        mode = self._state.mode
        if mode in (Mode.LIVE, Mode.ONE_STREAM):
            return Response.text(f"ok: {mode.value}")
        raise Refused(503, "no-stream", f"{mode.value}: no node stream from a server is live")
