"""``GET /v1/credentials``: the container-credentials endpoint, for pods that identify
themselves by a projected service-account token instead of by their IP.

SDKs with ``AWS_CONTAINER_CREDENTIALS_FULL_URI`` and ``AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE``
set (podiam's admission webhook sets both) send the file's content as the ``Authorization``
header and expect ``{"AccessKeyId", "SecretAccessKey", "Token", "Expiration"}``. The first
request with a token goes to the server (``GetTokenCredentials``), which reviews the token
and checks the pod it names as it checks every pod, node binding included. The answer names
the pod (IP and uid) and its identity; the agent keeps it by the token's hash, and from then
on answers from memory — a hash, two dictionary lookups and a response rendered once per
credential set, as the metadata hot path — for as long as the node stream still shows that
very pod (same uid) on that IP with that identity, and the token has not expired. The moment
the stream withdraws the pod, its token goes back to the server, which refuses it.

`ContainerCredentials` is a route table (agent/httpserver.py's `RouteTable`) for a second
`HttpListener` on its own port and DNAT rule: ``immediate`` is the known-token path,
``respond`` the rest (first requests, refusals as JSON ``{"code", "message"}``). It shares the
metadata listener's limits and code, and nothing of the metadata API's routes. Its listener
takes headers up to ``HEADER_BYTES`` whatever ``--max-header-bytes`` says: a projected token
is 1-2 KiB, the endpoint accepts up to 16 KiB, and the listener must never refuse with a 431
a token the endpoint would have taken.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass

import grpc

from agent import metrics, wire
from agent.client import ServerClient
from agent.limits import ListenerLimits, OncePer, PodBuckets, hit, retry_after
from agent.refusal import Refused
from agent.request import Request
from agent.state import NodeState
from protos import REASON_METADATA, kiam_pb2

log = logging.getLogger(__name__)

PATH = "/v1/credentials"
ROUTE = "container-credentials"
JSON = "application/json"
# botocore gives the endpoint 2 s per attempt; the server's answer (a TokenReview on a new
# token) must come inside that.
SERVER_SECONDS = 1.5
# Tokens remembered at most (one per pod using the endpoint on this node; rotated ones age out).
MAX_TOKENS = 4096
_MAX_TOKEN_BYTES = 16 * 1024
# The token listener's header limit at least: the largest token taken, and room for the
# request line and the other headers a client sends.
HEADER_BYTES = _MAX_TOKEN_BYTES + 4096
_REASON_LABEL = re.compile(r"[a-z][a-z-]{0,31}")
_PATH_BYTES = PATH.encode()
_AUTHORIZATION = b"authorization"

_REFUSAL_FOR_CODE = {
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid-token"),
    grpc.StatusCode.NOT_FOUND: (404, "no-role"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "denied"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server-timeout"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "token-credentials-off"),
}


def token_limits(limits: ListenerLimits) -> ListenerLimits:
    """The metadata listener's limits, with room in the headers for any token taken."""
    return dataclasses.replace(limits, header_bytes=max(limits.header_bytes, HEADER_BYTES))


@dataclass(frozen=True, slots=True)
class _Known:
    """What the server said about one token."""

    ip: str
    uid: str
    identity: str
    expires: float  # the token's expiry, seconds since the epoch


@dataclass(frozen=True, slots=True)
class _Rendered:
    """One identity's answer: the IMDS document it came from, its body and its response."""

    document: bytes
    body: bytes
    response: wire.Rendered


def container_body(creds: kiam_pb2.Credentials) -> bytes:
    return json.dumps(
        {
            "AccessKeyId": creds.access_key_id,
            "SecretAccessKey": creds.secret_access_key,
            "Token": creds.token,
            "Expiration": creds.expiration,
        }
    ).encode()


def _from_imds_document(document: bytes) -> bytes:
    fields = json.loads(document)
    return json.dumps(
        {
            "AccessKeyId": fields["AccessKeyId"],
            "SecretAccessKey": fields["SecretAccessKey"],
            "Token": fields["Token"],
            "Expiration": fields["Expiration"],
        }
    ).encode()


class ContainerCredentials:
    """The token listener's route table (agent/httpserver.py's `RouteTable`)."""

    def __init__(
        self,
        state: NodeState,
        client: ServerClient,
        *,
        synced_once: asyncio.Event,
        buckets: PodBuckets | None = None,
        wall=time.time,
    ) -> None:
        self._state = state
        self._client = client
        self._synced_once = synced_once
        # Each pod's fair share, as on the metadata API: a pod looping on unknown tokens
        # would otherwise cost the server a TokenReview each.
        self._buckets = PodBuckets(rate=0, burst=0) if buckets is None else buckets
        self._wall = wall
        self._log = OncePer(log, interval=10.0)
        self._known: dict[bytes, _Known] = {}
        self._rendered: dict[str, _Rendered] = {}  # by identity

    # ---- the hot path -------------------------------------------------------------------

    def immediate(
        self, method: bytes, target: bytes, headers: dict[bytes, bytes], ip: str
    ) -> wire.Rendered | None:
        """A known token's credentials, from memory; None for everything else (`respond`
        then decides, refusals included)."""
        if method != b"GET" or target.partition(b"?")[0] != _PATH_BYTES:
            return None
        started = time.perf_counter()
        token = _token(headers.get(_AUTHORIZATION))
        if token is None:
            return None
        rendered = self._known_rendered(token)
        if rendered is None:
            return None
        response = rendered.response
        wait = self._buckets.take(ip)
        if wait:
            response = self._throttled(ip, wait)
        metrics.REQUESTS.count(ROUTE, response.status, time.perf_counter() - started)
        return response

    def known(self, token: str) -> bytes | None:
        """The body memory answers ``token`` with, or None when memory cannot answer."""
        rendered = self._known_rendered(token.encode("latin-1"))
        return None if rendered is None else rendered.body

    def _known_rendered(self, token: bytes) -> _Rendered | None:
        """A token the server vouched for, whose pod the node stream still shows on its IP."""
        key = hashlib.sha256(token).digest()
        known = self._known.get(key)
        if known is None:
            return None
        state = self._state
        entry = state.usable_entry(known.ip)
        if (
            entry is None
            or entry.uid != known.uid
            or entry.identity != known.identity
            or known.expires <= self._wall()
        ):
            del self._known[key]  # the pod went, its grant changed, or the token expired
            return None
        document = state.usable_credentials(known.identity)
        if document is None:
            return None
        rendered = self._rendered.get(known.identity)
        if rendered is None or rendered.document is not document:
            # Once per credential set: the node stream brings a new document on renewal.
            body = _from_imds_document(document)
            rendered = _Rendered(document, body, wire.render(200, body, JSON))
            self._rendered[known.identity] = rendered
        return rendered

    def forget_idle(self) -> None:
        """Called by the listener now and then: buckets of pods that stopped asking go."""
        self._buckets.forget_full()

    # ---- everything else ----------------------------------------------------------------

    async def respond(self, request: Request) -> wire.Rendered:
        started = time.perf_counter()
        try:
            response = await self._answer(request)
        except Refused as refused:
            response = self._refuse(request, refused)
        metrics.REQUESTS.count(ROUTE, response.status, time.perf_counter() - started)
        return response

    async def _answer(self, request: Request) -> wire.Rendered:
        if request.path != PATH:
            raise Refused(404, "blocked-path", f"only {PATH} is served here")
        if request.method not in ("GET", "HEAD"):
            raise Refused(405, "bad-method", "method not allowed here; use GET")
        token = _token(request.headers.get(_AUTHORIZATION))
        if token is None:
            raise Refused(
                401,
                "token-required",
                "the Authorization header must carry the pod's podiam service-account token "
                "(AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE)",
            )
        wait = self._buckets.take(request.ip)
        if wait:
            return self._throttled(request.ip, wait)
        rendered = self._known_rendered(token)
        if rendered is not None:
            return rendered.response
        return wire.render(200, await self.from_server(token), JSON)

    async def from_server(self, token: bytes) -> bytes:
        if not self._synced_once.is_set():
            raise Refused(503, "not-connected", "the agent is not connected to a podiam server")
        try:
            answer = await self._client.token_credentials(
                token.decode("latin-1"), seconds=SERVER_SECONDS
            )
        except grpc.aio.AioRpcError as error:
            raise _refusal(error) from None
        if answer.ip and answer.uid and answer.identity:
            self._remember(token, answer)
        return container_body(answer.credentials)

    def _remember(self, token: bytes, answer: kiam_pb2.TokenCredentials) -> None:
        known = self._known
        if len(known) >= MAX_TOKENS:
            now = self._wall()
            for stale in [k for k, v in known.items() if v.expires <= now]:
                del known[stale]
            while len(known) >= MAX_TOKENS:
                del known[next(iter(known))]
        key = hashlib.sha256(token).digest()
        known[key] = _Known(
            ip=answer.ip, uid=answer.uid, identity=answer.identity,
            expires=float(answer.token_expires),
        )  # fmt: skip

    def _throttled(self, ip: str, wait: float) -> wire.Rendered:
        hit("pod-rate")
        metrics.REFUSALS.labels(reason="rate-limited").inc()
        self._log(
            f"rate-limited|{ip}",
            logging.WARNING,
            "%s from %s refused: 429: over its fair share of requests",
            ROUTE,
            ip,
        )
        return _too_many(retry_after(wait))

    def _refuse(self, request: Request, refused: Refused) -> wire.Rendered:
        metrics.REFUSALS.labels(reason=refused.reason).inc()
        # Never the token: the path and the caller only. One line per pod, kind of refusal
        # and interval, as on the metadata API.
        self._log(
            f"{refused.reason}|{request.ip}",
            logging.INFO,
            "%s %s from %s refused: %d %s: %s",
            request.method[:16], _printable(request.path), request.ip, refused.status,
            refused.reason, refused.message,
        )  # fmt: skip
        return _json_refusal(refused.status, refused.reason, refused.message)


def _token(value: bytes | None) -> bytes | None:
    """The token in an ``Authorization`` header (``Bearer`` optional), or None."""
    if value is None:
        return None
    token = value.strip()
    if token[:7].lower() == b"bearer ":
        token = token[7:].strip()
    if not token or len(token) > _MAX_TOKEN_BYTES:
        return None
    return token


def _refusal(error: grpc.aio.AioRpcError) -> Refused:
    status, reason = _REFUSAL_FOR_CODE.get(error.code(), (503, "server-unavailable"))
    for key, value in error.trailing_metadata() or ():
        if key == REASON_METADATA and isinstance(value, str) and _REASON_LABEL.fullmatch(value):
            reason = value
    return Refused(status, reason, f"podiam server: {error.details() or error.code().name}")


def _json_refusal(
    status: int, code: str, message: str, headers: tuple[tuple[str, str], ...] = ()
) -> wire.Rendered:
    # The SDKs' container providers read an error body as {"code", "message"} (Go, Rust) or
    # show it whole (botocore, the JS SDK).
    body = json.dumps({"code": code, "message": message}).encode()
    return wire.render(status, body, JSON, headers)


@functools.lru_cache(maxsize=16)
def _too_many(seconds: int) -> wire.Rendered:
    return _json_refusal(
        429,
        "rate-limited",
        "too many requests from this pod; retry later",
        (("Retry-After", str(seconds)),),
    )


def _printable(path: str) -> str:
    return path[:200].encode("ascii", "backslashreplace").decode()
