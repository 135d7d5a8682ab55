"""``GET /v1/credentials``: the container-credentials endpoint, for pods that identify
themselves by a projected service-account token instead of by their IP.

SDKs with ``AWS_CONTAINER_CREDENTIALS_FULL_URI`` and ``AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE``
set (podiam's admission webhook sets both) send the file's content as the ``Authorization``
header and expect ``{"AccessKeyId", "SecretAccessKey", "Token", "Expiration"}``. The first
request with a token goes to the server (``GetTokenCredentials``), which reviews the token
and checks the pod it names as it checks every pod, node binding included. The answer names
the pod (IP and uid) and its identity; the agent keeps it by the token's hash, and from then
on answers from memory — a hash, two dictionary lookups and pre-rendered bytes, as the
metadata hot path — for as long as the node stream still shows that very pod (same uid) on
that IP with that identity, and the token has not expired. The moment the stream withdraws the
pod, its token goes back to the server, which refuses it.

Its own module and its own listening socket (aiohttp), so that it is independent of how the
metadata API's listener is built.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass

import grpc
from aiohttp import web

from agent import metrics
from agent.client import ServerClient
from agent.refusal import Refused
from agent.state import NodeState
from protos import REASON_METADATA, kiam_pb2

log = logging.getLogger(__name__)

PATH = "/v1/credentials"
ROUTE = "container-credentials"
# botocore gives the endpoint 2 s per attempt; the server's answer (a TokenReview on a new
# token) must come inside that.
SERVER_SECONDS = 1.5
# Tokens remembered at most (one per pod using the endpoint on this node; rotated ones age out).
MAX_TOKENS = 4096
_MAX_TOKEN_BYTES = 16 * 1024
_REASON_LABEL = re.compile(r"[a-z][a-z-]{0,31}")

_REFUSAL_FOR_CODE = {
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid-token"),
    grpc.StatusCode.NOT_FOUND: (404, "no-role"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "denied"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server-timeout"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "token-credentials-off"),
}


@dataclass(frozen=True, slots=True)
class _Known:
    """What the server said about one token."""

    ip: str
    uid: str
    identity: str
    expires: float  # the token's expiry, seconds since the epoch


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
    def __init__(
        self,
        state: NodeState,
        client: ServerClient,
        *,
        synced_once: asyncio.Event,
        wall=time.time,
    ) -> None:
        self._state = state
        self._client = client
        self._synced_once = synced_once
        self._wall = wall
        self._known: dict[str, _Known] = {}
        # identity → (the IMDS document it was rendered from, the container document)
        self._rendered: dict[str, tuple[bytes, bytes]] = {}

    def known(self, token: str) -> bytes | None:
        """The hot path: a token the server vouched for, whose pod the node stream still
        shows on its IP; None when memory cannot answer."""
        key = hashlib.sha256(token.encode()).digest()
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
        if rendered is None or rendered[0] is not document:
            rendered = (document, _from_imds_document(document))
            self._rendered[known.identity] = rendered
        return rendered[1]

    async def from_server(self, token: str) -> bytes:
        if not self._synced_once.is_set():
            raise Refused(503, "not-connected", "the agent is not connected to a podiam server")
        try:
            answer = await self._client.token_credentials(token, seconds=SERVER_SECONDS)
        except grpc.aio.AioRpcError as error:
            raise _refusal(error) from None
        if answer.ip and answer.uid and answer.identity:
            self._remember(token, answer)
        return container_body(answer.credentials)

    def _remember(self, token: str, answer: kiam_pb2.TokenCredentials) -> None:
        known = self._known
        if len(known) >= MAX_TOKENS:
            now = self._wall()
            for stale in [k for k, v in known.items() if v.expires <= now]:
                del known[stale]
            while len(known) >= MAX_TOKENS:
                del known[next(iter(known))]
        key = hashlib.sha256(token.encode()).digest()
        known[key] = _Known(
            ip=answer.ip, uid=answer.uid, identity=answer.identity,
            expires=float(answer.token_expires),
        )  # fmt: skip

    async def handle(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            body = await self._answer(request)
            response = web.Response(body=body, content_type="application/json")
        except Refused as refused:
            response = _refuse(request, refused)
        metrics.REQUESTS.count(ROUTE, response.status, time.perf_counter() - started)
        return response

    async def _answer(self, request: web.Request) -> bytes:
        if request.path != PATH:
            raise Refused(404, "blocked-path", f"only {PATH} is served here")
        if request.method not in ("GET", "HEAD"):
            raise Refused(405, "bad-method", "method not allowed here; use GET")
        token = request.headers.get("Authorization", "").strip()
        if token[:7].lower() == "bearer ":
            token = token[7:].strip()
        if not token or len(token) > _MAX_TOKEN_BYTES:
            raise Refused(
                401,
                "token-required",
                "the Authorization header must carry the pod's podiam service-account token "
                "(AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE)",
            )
        body = self.known(token)
        if body is None:
            body = await self.from_server(token)
        return body


def _refusal(error: grpc.aio.AioRpcError) -> Refused:
    status, reason = _REFUSAL_FOR_CODE.get(error.code(), (503, "server-unavailable"))
    for key, value in error.trailing_metadata() or ():
        if key == REASON_METADATA and isinstance(value, str) and _REASON_LABEL.fullmatch(value):
            reason = value
    return Refused(status, reason, f"podiam server: {error.details() or error.code().name}")


def _refuse(request: web.Request, refused: Refused) -> web.Response:
    metrics.REFUSALS.labels(reason=refused.reason).inc()
    # Never the token: the path and the caller only.
    log.info(
        "%s %s from %s refused: %d %s: %s",
        request.method, request.path[:200], request.remote, refused.status, refused.reason,
        refused.message,
    )  # fmt: skip
    # The SDKs' container providers read an error body as {"code", "message"} (Go, Rust) or
    # show it whole (botocore, the JS SDK).
    body = json.dumps({"code": refused.reason, "message": refused.message})
    return web.Response(status=refused.status, text=body, content_type="application/json")


def container_credentials_app(endpoint: ContainerCredentials) -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", endpoint.handle)
    return app
