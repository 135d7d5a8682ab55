"""``PUT /latest/api/token``: IMDSv2 session tokens, bound to the caller's IP."""

from __future__ import annotations

from agent.refusal import Refused
from agent.request import Request
from agent.tokens import MAX_TTL, MIN_TTL, TokenAuthority, parse_ttl
from agent.wire import Response
from runtime.imds import TOKEN_TTL_HEADER as TTL_HEADER


class TokenHandler:
    def __init__(self, authority: TokenAuthority) -> None:
        self._authority = authority

    async def __call__(self, request: Request) -> Response:
        # Real IMDS refuses token requests that went through a proxy, so that a token cannot be
        # obtained by tricking a forwarding service on the instance into asking for one.
        if request.header("X-Forwarded-For") is not None:
            raise Refused(403, "forwarded-token-request", "token requests must not be forwarded")
        ttl = parse_ttl(request.header(TTL_HEADER))
        if ttl is None:
            raise Refused(
                400, "bad-token-ttl", f"{TTL_HEADER} must be a number from {MIN_TTL} to {MAX_TTL}"
            )
        return Response.text(
            self._authority.mint(request.ip, ttl), headers=((TTL_HEADER, str(ttl)),)
        )
