"""The allow-listed proxy to the node's real metadata service.

Pods sometimes need a few facts about their node that only the metadata service knows — the
region and availability zone above all, which SDKs read to pick endpoints. The agent stands in
front of the real service for every pod, so it forwards those few paths and nothing else: the
node's credentials, its user-data (often full of secrets) and everything not on the allow-list
stay out of reach.

How a request is forwarded, and why:

- Only canonical paths (see `agent.paths`) that **fully** match the allow-list are forwarded.
  ``re.fullmatch``, not the ``search`` kiam used for ``--allow-route-regexp``: with ``search``
  an unanchored pattern matches anywhere, so ``placement/.*`` would also allow any path that
  merely contains ``placement/`` — under ``/latest/meta-data/iam/`` or ``/latest/user-data/``
  just as well. With ``fullmatch`` a pattern must describe the whole path; one that forgets the
  leading ``/latest/...`` matches nothing, which fails closed. Because paths are canonical (no
  ``..``, no escapes), ``/latest/meta-data/placement/.*`` cannot climb out of placement either.
  A path that does not match answers 404, as IMDS does for unknown paths, without any upstream
  request.
- Only GET and HEAD. HEAD is fetched upstream as GET (answers are a few hundred bytes) so both
  share the cache and the caller's answer carries the right Content-Length; aiohttp never sends
  a body in answer to HEAD.
- The query string is dropped: IMDS ignores it, and forwarding it would only widen what a pod
  can put in front of the real service.
- None of the pod's headers are forwarded — the API takes none. Upstream sees the agent's own
  User-Agent and, when it has one, the agent's own IMDSv2 token. The pod's token (minted by the
  agent, meaningless upstream) and X-Forwarded-For never leave the node's agent; a real IMDS
  refuses token requests carrying X-Forwarded-For anyway.
- The agent holds its own IMDSv2 token: nodes commonly require IMDSv2 with a hop limit of 1, so
  a pod's own token request could never reach the real service. The token is fetched on first
  use and renewed at 80% of its lifetime (the TTL upstream echoes, if shorter, wins); a 401 from
  upstream drops it and the request is retried once with a fresh one. If the token request is
  refused (403/404/405 or any other HTTP error: an IMDSv1-only endpoint), the proxy carries on
  without a token and asks again after `TOKEN_RETRY_SECONDS`, or at once if upstream answers
  401 to a tokenless request.
- Redirects are never followed: a redirect could point at a path that is not allowed. An upstream
  3xx (which the allowed leaf paths never produce) answers 502.
- ``timeout`` is the budget for the whole fetch, token request included; SDKs wait only about
  a second for the metadata service, so a slow upstream must fail fast rather than queue.
- Failures never raise: unreachable upstream or timeout → 502; an upstream 401 that survives a
  fresh token → 502 (the pod's own token was fine; it is the agent that upstream refuses); every
  other upstream status, 404 included, is passed through with its body.
- 200 answers are cached per path, for ``cache_ttl`` seconds (default 5 minutes), only for the
  paths in `STATIC_PATHS` — facts fixed for the life of an instance (region, zone, identity
  document). Nothing else is cached, because an operator's allow-list may include paths that
  change (``spot/instance-action``, ``events/maintenance/scheduled``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from agent.paths import PathRejected, canonical_path
from runtime.imds import ENDPOINT, TOKEN_HEADER, TOKEN_PATH, TOKEN_TTL_HEADER

DEFAULT_ALLOW_ROUTE_REGEXP = (
    r"^/latest/meta-data/placement/(region|availability-zone)$"
    r"|^/latest/dynamic/instance-identity/document$"
)

# Facts that do not change for the life of an instance; only these are ever cached.
STATIC_PATHS = frozenset(
    {
        "/latest/meta-data/placement/region",
        "/latest/meta-data/placement/availability-zone",
        "/latest/meta-data/placement/availability-zone-id",
        "/latest/dynamic/instance-identity/document",
        "/latest/dynamic/instance-identity/signature",
        "/latest/dynamic/instance-identity/pkcs7",
        "/latest/dynamic/instance-identity/rsa2048",
    }
)

MAX_TOKEN_TTL = 21600
# Renew the upstream token once this fraction of its lifetime has passed.
TOKEN_RENEW_FRACTION = 0.8
# After upstream refused to issue a token (IMDSv1 only), ask again after this long.
TOKEN_RETRY_SECONDS = 60.0
# The identity document is ~500 bytes; anything far bigger is not what the allow-list meant.
MAX_BODY_BYTES = 256 * 1024
USER_AGENT = "podiam-agent"

log = logging.getLogger(__name__)

# status, body, content type, headers of one upstream answer
_Answer = tuple[int, bytes, str, "CIMultiDictProxy[str]"]


@dataclass(frozen=True, slots=True)
class ProxyAnswer:
    status: int
    body: bytes
    content_type: str


class _Unreachable(Exception):
    """Upstream could not be reached in time (connection failure, timeout, broken answer)."""


class _TokenRefused(Exception):
    """Upstream answered the token request with an error: it does not do IMDSv2."""


def _error(status: int, message: str) -> ProxyAnswer:
    return ProxyAnswer(status=status, body=message.encode(), content_type="text/plain")


class MetadataProxy:
    """Forwards allow-listed metadata paths to the real metadata service at ``endpoint``.

    ``allow`` is matched with ``re.fullmatch`` against the canonical path, so an unanchored
    pattern such as ``placement/.*`` matches nothing (it does not start with ``/``) and
    ``/latest/meta-data/placement/.*`` matches only paths below placement — never
    ``/latest/meta-data/iam/...``. Anchors in the pattern are harmless.

    ``session`` is used as given and not closed by `close`; without one the proxy makes its own
    (no cookie jar, no proxy from the environment) on first use.
    """

    def __init__(
        self,
        endpoint: str = ENDPOINT,
        *,
        allow: re.Pattern[str],
        session: aiohttp.ClientSession | None = None,
        timeout: float = 2.0,
        token_ttl: int = MAX_TOKEN_TTL,
        cache_ttl: float = 300.0,
    ) -> None:
        if not 1 <= token_ttl <= MAX_TOKEN_TTL:
            raise ValueError(f"token_ttl must be 1..{MAX_TOKEN_TTL} seconds, not {token_ttl}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        self._endpoint = endpoint.rstrip("/")
        self._allow = allow
        self._session = session
        self._owns_session = session is None
        self._timeout = timeout
        self._token_ttl = token_ttl
        self._cache_ttl = cache_ttl
        self._cache: dict[str, tuple[float, ProxyAnswer]] = {}
        self._token: str | None = None
        self._token_renew_at = 0.0  # monotonic; when to renew self._token
        self._token_retry_at = 0.0  # monotonic; when to ask again after a refusal
        self._token_lock = asyncio.Lock()

    def allows(self, path: str) -> bool:
        """Whether the canonical ``path`` is on the allow-list (``re.fullmatch``)."""
        return self._allow.fullmatch(path) is not None

    async def fetch(self, method: str, path: str, query: str = "") -> ProxyAnswer:
        """Answer ``method path`` from the real metadata service. Never raises.

        ``query`` is accepted for the caller's convenience and dropped (IMDS ignores it).
        A path that is not canonical answers 400, one that is not allowed 404, a method other
        than GET/HEAD 405 — none of them reaching upstream.
        """
        del query
        if method not in ("GET", "HEAD"):
            return _error(405, "method not allowed")
        try:
            canonical_path(path)
        except PathRejected as exc:
            return _error(400, str(exc))
        if not self.allows(path):
            return _error(404, "not found")
        cached = self._cached(path)
        if cached is not None:
            return cached
        try:
            answer = await self._fetch_upstream(path)
        except _Unreachable as exc:
            log.warning("metadata proxy: upstream failed for %s: %s", path, exc)
            return _error(502, "metadata service unavailable")
        except Exception:
            log.exception("metadata proxy: unexpected failure for %s", path)
            return _error(502, "metadata service error")
        if answer.status == 200 and path in STATIC_PATHS and self._cache_ttl > 0:
            self._cache[path] = (time.monotonic() + self._cache_ttl, answer)
        return answer

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None

    # -- upstream -----------------------------------------------------------------------------

    def _cached(self, path: str) -> ProxyAnswer | None:
        entry = self._cache.get(path)
        if entry is None:
            return None
        expires, answer = entry
        if time.monotonic() >= expires:
            del self._cache[path]
            return None
        return answer

    async def _fetch_upstream(self, path: str) -> ProxyAnswer:
        deadline = time.monotonic() + self._timeout
        token = await self._upstream_token(deadline)
        status, body, content_type, _ = await self._get(path, token, deadline)
        if status == 401:
            # Our token expired or upstream restarted (or it now wants IMDSv2): once more with
            # a fresh token.
            token = await self._upstream_token(deadline, rejected=token, force=True)
            status, body, content_type, _ = await self._get(path, token, deadline)
            if status == 401:
                log.warning("metadata proxy: upstream refused the agent's token for %s", path)
                return _error(502, "metadata service refused the agent's token")
        if 300 <= status < 400:
            log.warning("metadata proxy: upstream redirected %s (%d); not followed", path, status)
            return _error(502, "metadata service answered with a redirect")
        return ProxyAnswer(status=status, body=body, content_type=content_type)

    async def _get(self, path: str, token: str | None, deadline: float) -> _Answer:
        headers = {"User-Agent": USER_AGENT}
        if token is not None:
            headers[TOKEN_HEADER] = token
        # encoded=True: the canonical path goes out byte for byte, never re-quoted.
        url = URL(self._endpoint + path, encoded=True)
        return await self._request("GET", url, headers, deadline)

    async def _request(
        self, method: str, url: URL, headers: dict[str, str], deadline: float
    ) -> _Answer:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Unreachable("timed out")
        try:
            async with self._client().request(
                method,
                url,
                headers=headers,
                allow_redirects=False,
                skip_auto_headers=("Content-Type",),  # aiohttp adds one to the bodiless PUT
                timeout=aiohttp.ClientTimeout(total=remaining),
            ) as response:
                body = await _read_limited(response)
                return response.status, body, response.content_type, response.headers
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _Unreachable(str(exc) or type(exc).__name__) from exc

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(), trust_env=False
            )
        return self._session

    # -- the agent's own IMDSv2 token ---------------------------------------------------------

    async def _upstream_token(
        self, deadline: float, *, rejected: str | None = None, force: bool = False
    ) -> str | None:
        """The token to send upstream, or None to go without (IMDSv1).

        ``force`` after upstream answered 401 to a request made with ``rejected`` (None: with
        no token): fetch a new token now, unless a concurrent request already has.
        Raises `_Unreachable` when upstream cannot be reached.
        """
        async with self._token_lock:
            now = time.monotonic()
            if force:
                if self._token is not None and self._token != rejected:
                    return self._token  # renewed meanwhile by a concurrent request
            elif self._token is not None:
                if now < self._token_renew_at:
                    return self._token
            elif now < self._token_retry_at:
                return None
            self._token = None
            try:
                token, ttl = await self._put_token(deadline)
            except _TokenRefused as exc:
                log.info("metadata proxy: no IMDSv2 token upstream (%s); using IMDSv1", exc)
                self._token_retry_at = now + TOKEN_RETRY_SECONDS
                return None
            self._token = token
            self._token_renew_at = now + ttl * TOKEN_RENEW_FRACTION
            return token

    async def _put_token(self, deadline: float) -> tuple[str, int]:
        url = URL(self._endpoint + TOKEN_PATH, encoded=True)
        headers = {"User-Agent": USER_AGENT, TOKEN_TTL_HEADER: str(self._token_ttl)}
        status, body, _, answer_headers = await self._request("PUT", url, headers, deadline)
        if status != 200:
            raise _TokenRefused(f"token request answered {status}")
        ttl = self._token_ttl
        echoed = answer_headers.get(TOKEN_TTL_HEADER, "")
        if echoed.isdigit() and 0 < int(echoed) < ttl:
            ttl = int(echoed)  # upstream granted less than asked: believe upstream
        try:
            token = body.decode("ascii").strip()
        except UnicodeDecodeError:
            raise _TokenRefused("token is not ASCII") from None
        if not token:
            raise _TokenRefused("empty token")
        return token, ttl


async def _read_limited(response: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise aiohttp.ClientPayloadError(f"answer larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
