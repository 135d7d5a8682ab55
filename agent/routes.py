"""The metadata API's route table: canonicalise the path, check the IMDSv2 token and the pod's
fair share, pick the handler, and turn what it returns or refuses into the response, the metric
and the log line — the same way for every route.

Two doors, one set of rules (agent/httpserver.py calls them): ``immediate`` answers the hot
paths — a known pod asking for its role name or for credentials the node stream brought — from
bytes rendered once, without awaiting anything; whatever it cannot answer at once it leaves to
``respond``, which awaits the handlers. Paths are judged raw (agent/paths.py), before anything
decodes or normalises them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from agent import metrics, wire
from agent.handlers.credentials import CredentialsHandler
from agent.handlers.health import HealthHandler, ping
from agent.handlers.info import InfoHandler
from agent.handlers.proxy import ProxyHandler
from agent.handlers.role import RoleHandler
from agent.handlers.token import TokenHandler
from agent.limits import OncePer, PodBuckets, hit, retry_after
from agent.lookup import PodLookup
from agent.paths import PathRejected, canonical_path
from agent.refusal import Refused
from agent.request import Request
from agent.tokens import TokenAuthority
from runtime import imds

log = logging.getLogger(__name__)

CREDENTIALS = imds.CREDENTIALS_PATH
EXTENDED = imds.EXTENDED_CREDENTIALS_PATH
INFO = imds.INFO_PATH
TOKEN = imds.TOKEN_PATH
_READ = frozenset({"GET", "HEAD"})
_CREDENTIALS_BYTES = CREDENTIALS.encode()
_TOKEN_HEADER = imds.TOKEN_HEADER.lower().encode()
# Probes are never throttled: the kubelet's liveness probe must not fail because a pod floods.
_UNTHROTTLED = frozenset({"/ping", "/health"})

Handler = Callable[..., Awaitable[wire.Response]]


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
        lookup: PodLookup,
        buckets: PodBuckets,
        require_imdsv2: bool,
    ) -> None:
        self._credentials = credentials
        self._proxy = proxy
        self._tokens = tokens
        self._lookup = lookup
        self._buckets = buckets
        self._require_imdsv2 = require_imdsv2
        self._token = token
        self._log = OncePer(log, interval=10.0)
        # Exact paths, with the route's name for metrics.
        self._exact: dict[str, tuple[str, Handler]] = {
            CREDENTIALS: ("role", role),
            INFO: ("info", info),
            "/ping": ("ping", ping),
            "/health": ("health", health),
        }

    # ---- the hot path -------------------------------------------------------------------

    def immediate(
        self, method: bytes, target: bytes, headers: dict[bytes, bytes], ip: str
    ) -> wire.Rendered | None:
        """The role name or credentials of a pod the node stream knows, from memory; None
        for everything else (`respond` then decides, refusals included)."""
        if method != b"GET" or not target.startswith(_CREDENTIALS_BYTES):
            return None
        started = time.perf_counter()
        try:
            path = canonical_path(target.partition(b"?")[0].decode("latin-1"))
        except PathRejected:
            return None
        token = headers.get(_TOKEN_HEADER)
        if token is not None:
            if not self._tokens.valid(token.decode("latin-1"), ip):
                return None
        elif self._require_imdsv2:
            return None
        if len(path) == len(CREDENTIALS):
            route = "role"
            role_name = self._lookup.known_role(ip)
            if role_name is None:
                return None
            rendered = wire.text(role_name)
        else:
            route = "credentials"
            try:
                served = self._lookup.known_served(ip, path[len(CREDENTIALS) :])
            except Refused:
                return None
            if served is None:
                return None
            rendered = served.response
        wait = self._buckets.take(ip)
        if wait:
            rendered = self._throttled(ip, route, wait)
        metrics.REQUESTS.count(route, rendered.status, time.perf_counter() - started)
        return rendered

    def forget_idle(self) -> None:
        """Called by the listener now and then: buckets of pods that stopped asking go."""
        self._buckets.forget_full()

    # ---- everything else ----------------------------------------------------------------

    async def respond(self, request: Request) -> wire.Response | wire.Rendered:
        started = time.perf_counter()
        route = "invalid"
        try:
            path = canonical_path(request.path)
            route, handler, args = self._resolve(request, path)
            if path not in _UNTHROTTLED:
                wait = self._buckets.take(request.ip)
                if wait:
                    rendered = self._throttled(request.ip, route, wait)
                    metrics.REQUESTS.count(route, rendered.status, time.perf_counter() - started)
                    return rendered
            response = await handler(*args)
        except PathRejected as rejected:
            response = self._refuse(request, route, Refused(400, rejected.reason, str(rejected)))
        except Refused as refused:
            response = self._refuse(request, route, refused)
        metrics.REQUESTS.count(route, response.status, time.perf_counter() - started)
        return response

    def _resolve(self, request: Request, path: str) -> tuple[str, Handler, tuple]:
        """The route's name (for metrics), its handler and the handler's arguments; refuses
        what no route takes."""
        method = request.method
        if path == TOKEN:
            if method != "PUT":
                raise _method_not_allowed("PUT")
            return "token", self._token, (request,)
        if method not in _READ:
            raise _method_not_allowed("GET, HEAD")
        self._check_token(request, path)
        if path.startswith(CREDENTIALS) and len(path) > len(CREDENTIALS):
            role = path[len(CREDENTIALS) :]
            return "credentials", self._credentials, (request, role)
        exact = self._exact.get(path)
        if exact is not None:
            name, handler = exact
            return name, handler, (request,)
        if path == CREDENTIALS.rstrip("/"):
            return "redirect", _redirect_to_credentials, ()
        if path == EXTENDED or path.startswith(EXTENDED + "/"):
            # Newer SDKs try this first and fall back to the classic path only on a 404.
            raise Refused(404, "extended", "security-credentials-extended is not served")
        return "proxy", self._proxy, (request, path)

    def _check_token(self, request: Request, path: str) -> None:
        token = request.header(imds.TOKEN_HEADER)
        if token is not None:
            if not self._tokens.valid(token, request.ip):
                raise Refused(401, "bad-token", "the IMDSv2 token is invalid or has expired")
            return
        if self._require_imdsv2 and _hands_out_role(path):
            raise Refused(401, "token-required", "an IMDSv2 token is required")

    def _throttled(self, ip: str, route: str, wait: float) -> wire.Rendered:
        hit("pod-rate")
        metrics.REFUSALS.labels(reason="rate-limited").inc()
        self._log(
            f"rate-limited|{ip}",
            logging.WARNING,
            "%s from %s refused: 429: over its fair share of requests",
            route,
            ip,
        )
        return _too_many(retry_after(wait))

    def _refuse(self, request: Request, route: str, refused: Refused) -> wire.Response:
        metrics.REFUSALS.labels(reason=refused.reason).inc()
        # One line per pod, kind of refusal and interval: a pod looping on a bad request (or a
        # fuzzer) must not turn the agent's log into its own, and every refused pod is named.
        self._log(
            f"{refused.reason}|{request.ip}",
            logging.INFO,
            "%s %s from %s refused: %d %s: %s",
            request.method,
            _printable(request.path),
            request.ip,
            refused.status,
            refused.reason,
            refused.message,
        )
        return wire.Response.text(refused.message + "\n", status=refused.status)


def _too_many(seconds: int) -> wire.Rendered:
    return _TOO_MANY.get(seconds) or wire.render(
        429,
        b"too many requests from this pod; retry later\n",
        wire.TEXT,
        (("Retry-After", str(seconds)),),
    )


_TOO_MANY = {
    seconds: wire.render(
        429,
        b"too many requests from this pod; retry later\n",
        wire.TEXT,
        (("Retry-After", str(seconds)),),
    )
    for seconds in range(1, 11)
}


def _printable(path: str) -> str:
    return path[:200].encode("ascii", "backslashreplace").decode()


async def _redirect_to_credentials() -> wire.Response:
    return wire.Response(301, headers=(("Location", CREDENTIALS),))


def _hands_out_role(path: str) -> bool:
    return path.startswith(CREDENTIALS) or path == INFO


def _method_not_allowed(allowed: str) -> Refused:
    return Refused(405, "bad-method", f"method not allowed here; use {allowed}")
