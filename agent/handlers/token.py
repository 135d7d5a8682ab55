"""``PUT /latest/api/token``: IMDSv2 session tokens, bound to the caller's IP."""

from __future__ import annotations

from aiohttp import web

from agent.refusal import Refused
from agent.tokens import MAX_TTL, MIN_TTL, TokenAuthority, parse_ttl
from runtime.imds import TOKEN_TTL_HEADER as TTL_HEADER


class TokenHandler:
    def __init__(self, authority: TokenAuthority) -> None:
        self._authority = authority

    async def __call__(self, request: web.Request, ip: str) -> web.Response:
        # Real IMDS refuses token requests that went through a proxy, so that a token cannot be
        # obtained by tricking a forwarding service on the instance into asking for one.
        if "X-Forwarded-For" in request.headers:
            raise Refused(403, "forwarded-token-request", "token requests must not be forwarded")
        ttl = parse_ttl(request.headers.get(TTL_HEADER))
        if ttl is None:
            raise Refused(
                400, "bad-token-ttl", f"{TTL_HEADER} must be a number from {MIN_TTL} to {MAX_TTL}"
            )
        return web.Response(
            text=self._authority.mint(ip, ttl),
            content_type="text/plain",
            headers={TTL_HEADER: str(ttl)},
        )
