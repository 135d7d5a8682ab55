"""The metadata API's one entry point: canonicalise the path, check the IMDSv2 token, pick the
handler, and turn what it returns or refuses into the response, the metric and the log line —
the same way for every route.

A single catch-all aiohttp route with dictionary dispatch, rather than aiohttp's router: the
path must be checked raw before anything decodes or normalises it, and the credentials route is
the hot path, reached here with one prefix test.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from agent import metrics
from agent.handlers.credentials import CredentialsHandler
from agent.handlers.health import HealthHandler, ping
from agent.handlers.info import InfoHandler
from agent.handlers.proxy import ProxyHandler
from agent.handlers.role import RoleHandler
from agent.handlers.token import TokenHandler
from agent.paths import PathRejected, canonical_path
from agent.refusal import Refused
from agent.tokens import TokenAuthority
from runtime import imds

log = logging.getLogger(__name__)

CREDENTIALS = imds.CREDENTIALS_PATH
EXTENDED = imds.EXTENDED_CREDENTIALS_PATH
INFO = imds.INFO_PATH
TOKEN = imds.TOKEN_PATH
_READ = frozenset({"GET", "HEAD"})

Handler = Callable[..., Awaitable[web.StreamResponse]]


class MetadataRoutes:
    def __init__(
        self,
        *,
        role: RoleHandler,
        credentials: CredentialsHandler,
        info: InfoHandler,
        token: TokenHandler,
        health: HealthHandler,
        proxy: ProxyHandler,
        tokens: TokenAuthority,
        require_imdsv2: bool,
    ) -> None:
        self._credentials = credentials
        self._proxy = proxy
        self._tokens = tokens
        self._require_imdsv2 = require_imdsv2
        self._token = token
        # Set while the agent drains at shutdown: every answer tells the client to close.
        self.draining = False
        # Exact paths, with the route's name for metrics.
        self._exact: dict[str, tuple[str, Handler]] = {
            CREDENTIALS: ("role", role),
            INFO: ("info", info),
            "/ping": ("ping", ping),
            "/health": ("health", health),
        }

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        route = "invalid"
        try:
            path = canonical_path(request.raw_path.partition("?")[0])
            ip = request.remote or ""
            route, handler, args = self._resolve(request, path, ip)
            response = await handler(*args)
        except PathRejected as rejected:
            response = self._refuse(request, route, Refused(400, rejected.reason, str(rejected)))
        except Refused as refused:
            response = self._refuse(request, route, refused)
        metrics.REQUESTS.count(route, response.status, time.perf_counter() - started)
        if self.draining and not response.prepared:
            response.force_close()
        return response

    def _resolve(self, request: web.Request, path: str, ip: str) -> tuple[str, Handler, tuple]:
        """The route's name (for metrics), its handler and the handler's arguments; refuses
        what no route takes."""
        method = request.method
        if path == TOKEN:
            if method != "PUT":
                raise _method_not_allowed("PUT")
            return "token", self._token, (request, ip)
        if method not in _READ:
            raise _method_not_allowed("GET, HEAD")
        self._check_token(request, ip, path)
        if path.startswith(CREDENTIALS) and len(path) > len(CREDENTIALS):
            role = path[len(CREDENTIALS) :]
            return "credentials", self._credentials, (request, ip, role)
        exact = self._exact.get(path)
        if exact is not None:
            name, handler = exact
            return name, handler, (request, ip)
        if path == CREDENTIALS.rstrip("/"):
            return "redirect", _redirect_to_credentials, ()
        if path == EXTENDED or path.startswith(EXTENDED + "/"):
            # Newer SDKs try this first and fall back to the classic path only on a 404.
            raise Refused(404, "extended", "security-credentials-extended is not served")
        return "proxy", self._proxy, (request, ip, path)

    def _check_token(self, request: web.Request, ip: str, path: str) -> None:
        token = request.headers.get(imds.TOKEN_HEADER)
        if token is not None:
            if not self._tokens.valid(token, ip):
                raise Refused(401, "bad-token", "the IMDSv2 token is invalid or has expired")
            return
        if self._require_imdsv2 and _hands_out_role(path):
            raise Refused(401, "token-required", "an IMDSv2 token is required")

    @staticmethod
    def _refuse(request: web.Request, route: str, refused: Refused) -> web.Response:
        metrics.REFUSALS.labels(reason=refused.reason).inc()
        log.info(
            "%s %s from %s refused: %d %s: %s",
            request.method,
            request.raw_path[:200],
            request.remote,
            refused.status,
            refused.reason,
            refused.message,
        )
        return web.Response(
            status=refused.status, text=refused.message + "\n", content_type="text/plain"
        )


async def _redirect_to_credentials() -> web.Response:
    return web.Response(status=301, headers={"Location": CREDENTIALS})


def _hands_out_role(path: str) -> bool:
    return path.startswith(CREDENTIALS) or path == INFO


def _method_not_allowed(allowed: str) -> Refused:
    return Refused(405, "bad-method", f"method not allowed here; use {allowed}")
