"""The allow-listed metadata proxy against a real metadata service: moto in server mode.

moto answers the metadata API (region, zone, the node's credentials) but ignores IMDSv2 tokens
entirely. To prove what the proxy sends, a small aiohttp front sits between the proxy and moto:
it records every request's headers, issues its own tokens (with an expiry) and can demand them
(401 without a valid one, as a node with ``HttpTokens=required`` does), refuse token requests
(an IMDSv1-only endpoint), answer 404, redirect, stall or send an oversized body for chosen
paths. Everything else it forwards to moto unchanged.

moto 5.2 routes ``/latest/dynamic/...`` to its S3 emulation (an S3 ``NoSuchBucket`` 404), so
the identity document is only tested as "passed through as upstream answers it".
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from moto.server import ThreadedMotoServer
from multidict import CIMultiDict
from yarl import URL

from agent.proxy import (
    DEFAULT_ALLOW_ROUTE_REGEXP,
    MAX_BODY_BYTES,
    TOKEN_HEADER,
    TOKEN_TTL_HEADER,
    MetadataProxy,
    ProxyAnswer,
)

REGION = "/latest/meta-data/placement/region"
ZONE = "/latest/meta-data/placement/availability-zone"
DOCUMENT = "/latest/dynamic/instance-identity/document"
TOKEN_PATH = "/latest/api/token"
DEFAULT_ALLOW = re.compile(DEFAULT_ALLOW_ROUTE_REGEXP)
# The headers the proxy may send upstream; anything else would come from somewhere else.
UPSTREAM_HEADERS = {
    "host",
    "user-agent",
    "accept",
    "accept-encoding",
    "content-length",
    TOKEN_HEADER.lower(),
    TOKEN_TTL_HEADER.lower(),
}


@dataclass(frozen=True, slots=True)
class Seen:
    method: str
    target: str  # the raw request target, query included
    headers: CIMultiDict[str]
    status: int


@dataclass
class RecordingFront:
    """Test scaffolding: records requests, plays IMDSv2 and failure modes, forwards to moto."""

    moto_url: str
    seen: list[Seen] = field(default_factory=list)
    require_token: bool = False
    token_put_status: int | None = None  # refuse token requests with this status
    grant_ttl: int | None = None  # grant less than asked (echoed in the TTL header)
    not_found: set[str] = field(default_factory=set)
    redirect: dict[str, str] = field(default_factory=dict)
    oversized: set[str] = field(default_factory=set)
    delay: float = 0.0
    _tokens: dict[str, float] = field(default_factory=dict)  # token -> expiry (monotonic)
    _counter: Iterator[int] = field(default_factory=itertools.count)
    _client: aiohttp.ClientSession | None = None

    def reset(self) -> None:
        self.seen.clear()
        self.require_token = False
        self.token_put_status = None
        self.grant_ttl = None
        self.not_found.clear()
        self.redirect.clear()
        self.oversized.clear()
        self.delay = 0.0
        self._tokens.clear()

    def revoke_tokens(self) -> None:
        """As if the metadata service restarted: every issued token is now invalid."""
        self._tokens.clear()

    def requests(self, method: str | None = None, path: str | None = None) -> list[Seen]:
        return [
            s
            for s in self.seen
            if (method is None or s.method == method)
            and (path is None or s.target.partition("?")[0] == path)
        ]

    def issued_tokens(self) -> list[str]:
        return [
            s.headers["X-Issued-Token"] for s in self.requests("PUT", TOKEN_PATH) if s.status == 200
        ]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        response = await self._answer(request)
        headers = CIMultiDict(request.headers)
        if response.headers.get("X-Issued-Token"):
            headers["X-Issued-Token"] = response.headers["X-Issued-Token"]
        self.seen.append(Seen(request.method, request.raw_path, headers, response.status))
        return response

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        if self.delay:
            await asyncio.sleep(self.delay)
        path = request.raw_path.partition("?")[0]
        if path == TOKEN_PATH and request.method == "PUT":
            return self._issue_token(request)
        if self.require_token and not self._valid(request.headers.get(TOKEN_HEADER)):
            return web.Response(status=401, text="Unauthorized")
        if path in self.not_found:
            return web.Response(status=404, text="Not Found", content_type="text/html")
        if path in self.redirect:
            raise web.HTTPMovedPermanently(self.redirect[path])
        if path in self.oversized:
            return web.Response(body=b"x" * (MAX_BODY_BYTES + 1), content_type="text/plain")
        return await self._forward(request)

    def _issue_token(self, request: web.Request) -> web.Response:
        if self.token_put_status is not None:
            return web.Response(status=self.token_put_status, text="refused")
        asked = int(request.headers[TOKEN_TTL_HEADER])
        ttl = min(asked, self.grant_ttl or asked)
        token = f"front-token-{next(self._counter)}"
        self._tokens[token] = time.monotonic() + ttl
        return web.Response(
            text=token, headers={TOKEN_TTL_HEADER: str(ttl), "X-Issued-Token": token}
        )

    def _valid(self, token: str | None) -> bool:
        return token is not None and self._tokens.get(token, 0.0) > time.monotonic()

    async def _forward(self, request: web.Request) -> web.Response:
        if self._client is None:
            self._client = aiohttp.ClientSession()
        url = self.moto_url + request.raw_path
        async with self._client.request(request.method, URL(url, encoded=True)) as r:
            body = await r.read()
            return web.Response(status=r.status, body=body, content_type=r.content_type)


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    # One access-log line per request drowns every other log line.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
async def running_front(moto_url: str) -> AsyncIterator[tuple[RecordingFront, str]]:
    front = RecordingFront(moto_url)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", front.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield front, f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        if front._client is not None:
            await front._client.close()
        await runner.cleanup()


@pytest.fixture
def front(running_front: tuple[RecordingFront, str]) -> RecordingFront:
    running_front[0].reset()
    return running_front[0]


@pytest.fixture
def front_url(running_front: tuple[RecordingFront, str]) -> str:
    return running_front[1]


ProxyFactory = Callable[..., MetadataProxy]


@pytest.fixture
async def make_proxy(front: RecordingFront, front_url: str) -> AsyncIterator[ProxyFactory]:
    """Build proxies in front of the recording front (default allow-list); all closed after."""
    made: list[MetadataProxy] = []

    def make(endpoint: str = front_url, **kwargs: object) -> MetadataProxy:
        kwargs.setdefault("allow", DEFAULT_ALLOW)
        proxy = MetadataProxy(endpoint, **kwargs)  # type: ignore[arg-type]
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        await proxy.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def timed(coro: Awaitable[ProxyAnswer]) -> tuple[ProxyAnswer, float]:
    start = time.monotonic()
    answer = await coro
    return answer, time.monotonic() - start


# -- what pods get --------------------------------------------------------------------------


async def test_region_and_zone_come_from_the_real_metadata_service(
    make_proxy: ProxyFactory,
) -> None:
    proxy = make_proxy()
    assert await proxy.fetch("GET", REGION, "") == ProxyAnswer(200, b"us-east-1", "text/html")
    answer = await proxy.fetch("GET", ZONE, "")
    assert (answer.status, answer.body) == (200, b"us-east-1a")


async def test_identity_document_is_passed_through_as_upstream_answers(
    make_proxy: ProxyFactory, moto_url: str
) -> None:
    async with aiohttp.ClientSession() as client, client.get(moto_url + DOCUMENT) as direct:
        expected = (direct.status, direct.content_type, unique_ids_masked(await direct.read()))
    answer = await make_proxy().fetch("GET", DOCUMENT, "")
    assert (answer.status, answer.content_type, unique_ids_masked(answer.body)) == expected


def unique_ids_masked(body: bytes) -> bytes:
    """moto's error bodies carry a fresh request id each time."""
    return re.sub(rb"<(RequestId|HostId)>[^<]*<", rb"<\1>...<", body)


async def test_head_is_answered_like_get(make_proxy: ProxyFactory, front: RecordingFront) -> None:
    answer = await make_proxy().fetch("HEAD", REGION, "")
    assert (answer.status, answer.body) == (200, b"us-east-1")
    assert [s.method for s in front.requests(path=REGION)] == ["GET"]


@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE", "PATCH", "OPTIONS", "get"])
async def test_other_methods_are_refused_without_asking_upstream(
    make_proxy: ProxyFactory, front: RecordingFront, method: str
) -> None:
    answer = await make_proxy().fetch(method, REGION, "")
    assert answer.status == 405
    assert front.seen == []


async def test_query_string_is_dropped(make_proxy: ProxyFactory, front: RecordingFront) -> None:
    answer = await make_proxy(cache_ttl=0).fetch("GET", REGION, "x=1&path=/../iam/info")
    assert answer.status == 200
    assert [s.target for s in front.requests("GET")] == [REGION]


# -- the allow-list -------------------------------------------------------------------------


@pytest.mark.parametrize("path", [REGION, ZONE, DOCUMENT])
def test_default_allow_list_allows_region_zone_and_identity_document(path: str) -> None:
    assert MetadataProxy(allow=DEFAULT_ALLOW).allows(path)


DENIED_BY_DEFAULT = [
    "/latest/meta-data/iam/info",
    "/latest/user-data",
    "/latest/user-data/",
    "/latest/meta-data/iam/security-credentials/",
    "/latest/meta-data/iam/security-credentials/x",
    "/latest/meta-data/placement/region/",
    "/latest/meta-data/placement/regionX",
    "/latest/meta-data/placement/availability-zone-id",
    "/latest/meta-data/placement/",
    "/latest/meta-data/",
    "/latest/dynamic/instance-identity/document/",
    "/latest/dynamic/instance-identity/signature",
    "/latest/meta-data/instance-id",
    "/latest/api/token",
    "/",
    "",
    "/latest/meta-data/placement/region\n",  # "$" alone would match before a final newline
]


@pytest.mark.parametrize("path", DENIED_BY_DEFAULT)
def test_default_allow_list_denies_everything_else(path: str) -> None:
    assert not MetadataProxy(allow=DEFAULT_ALLOW).allows(path)


@pytest.mark.parametrize("path", DENIED_BY_DEFAULT)
async def test_denied_paths_answer_404_and_never_reach_upstream(
    make_proxy: ProxyFactory, front: RecordingFront, path: str
) -> None:
    answer = await make_proxy().fetch("GET", path, "")
    assert answer.status in (400, 404)  # 400: not even a canonical path
    assert b"us-east-1" not in answer.body
    assert front.seen == []


@pytest.mark.parametrize(
    "path",
    [
        "/latest/meta-data/placement/region/../../iam/security-credentials/",
        "/latest/meta-data/placement/region%2f..%2f..%2fiam%2finfo",
        "/latest/meta-data/placement//region",
        "/latest/meta-data/placement/./region",
    ],
)
async def test_non_canonical_paths_are_refused_even_if_a_prefix_is_allowed(
    make_proxy: ProxyFactory, front: RecordingFront, path: str
) -> None:
    proxy = make_proxy(allow=re.compile(r"/latest/meta-data/placement/.*"))
    assert (await proxy.fetch("GET", path, "")).status == 400
    assert front.seen == []


@pytest.mark.parametrize(
    "path",
    [
        "/latest/meta-data/iam/info",
        "/latest/meta-data/iam/security-credentials/",
        "/latest/meta-data/iam/security-credentials/placement/x",
        "/latest/user-data/placement/x",
        REGION,
    ],
)
def test_unanchored_user_regex_does_not_expose_iam_paths(path: str) -> None:
    # With re.search, "placement/.*" would allow anything containing "placement/".
    assert not MetadataProxy(allow=re.compile(r"placement/.*")).allows(path)


def test_user_regex_describing_whole_paths_allows_only_those() -> None:
    proxy = MetadataProxy(allow=re.compile(r"/latest/meta-data/placement/.*"))
    assert proxy.allows(REGION)
    assert proxy.allows("/latest/meta-data/placement/availability-zone-id")
    assert not proxy.allows("/latest/meta-data/iam/info")
    assert not proxy.allows("/latest/meta-data/iam/security-credentials/placement/")


# -- the agent's own IMDSv2 token -----------------------------------------------------------


async def test_agent_sends_its_own_token_and_nothing_of_the_pod(
    make_proxy: ProxyFactory, front: RecordingFront, front_url: str
) -> None:
    front.require_token = True
    answer = await make_proxy().fetch("GET", REGION, "")
    assert (answer.status, answer.body) == (200, b"us-east-1")

    [put] = front.requests("PUT", TOKEN_PATH)
    assert put.headers[TOKEN_TTL_HEADER] == "21600"
    assert TOKEN_HEADER not in put.headers
    [get] = front.requests("GET", REGION)
    assert get.headers.getall(TOKEN_HEADER) == front.issued_tokens()
    for seen in front.seen:
        assert "X-Forwarded-For" not in seen.headers
        assert "Forwarded" not in seen.headers
        assert seen.headers["Host"] == front_url.removeprefix("http://")
        assert seen.headers["User-Agent"] == "podiam-agent"
        assert "Cookie" not in seen.headers
        assert {name.lower() for name in seen.headers if name != "X-Issued-Token"} <= (
            UPSTREAM_HEADERS
        )


async def test_token_is_fetched_once_and_reused(
    make_proxy: ProxyFactory, front: RecordingFront
) -> None:
    front.require_token = True
    proxy = make_proxy(cache_ttl=0)
    answers = await asyncio.gather(*(proxy.fetch("GET", REGION, "") for _ in range(10)))
    answers.append(await proxy.fetch("GET", ZONE, ""))
    assert {a.status for a in answers} == {200}
    assert len(front.requests("PUT", TOKEN_PATH)) == 1
    assert len(front.requests("GET")) == 11
    assert all(s.status == 200 for s in front.requests("GET"))


async def test_token_is_renewed_before_it_expires(
    make_proxy: ProxyFactory, front: RecordingFront
) -> None:
    # The proxy asks for 6 h; upstream grants 1 s and says so. Upstream's word wins, and the
    # token is renewed at 80% of it, before upstream would refuse it.
    front.require_token = True
    front.grant_ttl = 1
    proxy = make_proxy(cache_ttl=0)
    assert (await proxy.fetch("GET", REGION, "")).status == 200
    await asyncio.sleep(0.5)
    assert (await proxy.fetch("GET", REGION, "")).status == 200
    assert len(front.requests("PUT", TOKEN_PATH)) == 1
    await asyncio.sleep(0.4)
    assert (await proxy.fetch("GET", REGION, "")).status == 200

    first, second = front.issued_tokens()
    assert [s.headers[TOKEN_HEADER] for s in front.requests("GET")] == [first, first, second]
    assert all(s.status == 200 for s in front.requests("GET"))  # never a 401


async def test_token_rejected_upstream_is_replaced_and_request_retried_once(
    make_proxy: ProxyFactory, front: RecordingFront
) -> None:
    front.require_token = True
    proxy = make_proxy(cache_ttl=0)
    assert (await proxy.fetch("GET", REGION, "")).status == 200
    front.revoke_tokens()  # the metadata service restarted
    answer = await proxy.fetch("GET", REGION, "")
    assert (answer.status, answer.body) == (200, b"us-east-1")

    first, second = front.issued_tokens()
    gets = front.requests("GET")
    assert [(s.headers[TOKEN_HEADER], s.status) for s in gets] == [
        (first, 200),
        (first, 401),
        (second, 200),
    ]


@pytest.mark.parametrize("refusal", [403, 404, 405])
async def test_imdsv1_only_upstream_is_used_without_a_token(
    make_proxy: ProxyFactory, front: RecordingFront, refusal: int
) -> None:
    front.token_put_status = refusal
    proxy = make_proxy(cache_ttl=0)
    for _ in range(3):
        answer = await proxy.fetch("GET", REGION, "")
        assert (answer.status, answer.body) == (200, b"us-east-1")
    # Refused once, not asked again on every request.
    assert len(front.requests("PUT", TOKEN_PATH)) == 1
    assert all(TOKEN_HEADER not in s.headers for s in front.requests("GET"))


async def test_upstream_that_starts_requiring_tokens_gets_one_at_once(
    make_proxy: ProxyFactory, front: RecordingFront
) -> None:
    front.token_put_status = 405
    proxy = make_proxy(cache_ttl=0)
    assert (await proxy.fetch("GET", REGION, "")).status == 200
    # The node is switched to HttpTokens=required: the first 401 brings a token request,
    # without waiting for the refusal back-off to pass.
    front.token_put_status = None
    front.require_token = True
    answer = await proxy.fetch("GET", REGION, "")
    assert (answer.status, answer.body) == (200, b"us-east-1")
    assert [s.status for s in front.requests("PUT", TOKEN_PATH)] == [405, 200]
    assert [s.status for s in front.requests("GET")] == [200, 401, 200]


async def test_upstream_refusing_the_agent_is_a_502_not_a_401(
    make_proxy: ProxyFactory, front: RecordingFront
) -> None:
    # Requires a token but will not issue one: the pod's token was fine, the agent's is not.
    front.require_token = True
    front.token_put_status = 403
    answer = await make_proxy().fetch("GET", REGION, "")
    assert answer.status == 502
    assert [s.status for s in front.requests("GET")] == [401, 401]


# -- upstream failures ----------------------------------------------------------------------


async def test_upstream_down_is_a_quick_502(make_proxy: ProxyFactory) -> None:
    proxy = make_proxy(f"http://127.0.0.1:{closed_port()}")
    answer, took = await timed(proxy.fetch("GET", REGION, ""))
    assert answer.status == 502
    assert answer.content_type == "text/plain"
    assert took < 0.5
    # And again: a failure is not cached.
    assert (await proxy.fetch("GET", REGION, "")).status == 502


async def test_upstream_too_slow_is_a_502_within_the_timeout(
    make_proxy: ProxyFactory, front: RecordingFront
) -> None:
    front.delay = 1.5
    answer, took = await timed(make_proxy(timeout=0.3).fetch("GET", REGION, ""))
    assert answer.status == 502
    assert took < 0.6  # one budget for token request and GET together


async def test_upstream_404_is_passed_through(
    make_proxy: ProxyFactory, front: RecordingFront
) -> None:
    front.not_found.add(ZONE)
    answer = await make_proxy().fetch("GET", ZONE, "")
    assert (answer.status, answer.body) == (404, b"Not Found")


async def test_other_upstream_statuses_are_passed_through(
    make_proxy: ProxyFactory, front: RecordingFront
) -> None:
    # moto answers 500 for metadata paths it does not implement.
    proxy = make_proxy(allow=re.compile(r"/latest/meta-data/not-implemented-by-moto"))
    answer = await proxy.fetch("GET", "/latest/meta-data/not-implemented-by-moto", "")
    assert answer.status == 500


async def test_upstream_redirect_is_not_followed(
    make_proxy: ProxyFactory, front: RecordingFront
) -> None:
    front.redirect[REGION] = "/latest/meta-data/iam/security-credentials/"
    answer = await make_proxy().fetch("GET", REGION, "")
    assert answer.status == 502
    assert front.requests(path="/latest/meta-data/iam/security-credentials/") == []


async def test_oversized_upstream_answer_is_a_502(
    make_proxy: ProxyFactory, front: RecordingFront
) -> None:
    front.oversized.add(ZONE)
    assert (await make_proxy().fetch("GET", ZONE, "")).status == 502


# -- caching --------------------------------------------------------------------------------


async def test_region_is_cached_for_a_while(
    make_proxy: ProxyFactory, front: RecordingFront
) -> None:
    proxy = make_proxy(cache_ttl=0.5)
    for method in ("GET", "GET", "HEAD"):
        answer = await proxy.fetch(method, REGION, "")
        assert (answer.status, answer.body) == (200, b"us-east-1")
    assert len(front.requests("GET", REGION)) == 1
    await asyncio.sleep(0.6)
    assert (await proxy.fetch("GET", REGION, "")).status == 200
    assert len(front.requests("GET", REGION)) == 2


async def test_paths_that_may_change_are_never_cached(
    make_proxy: ProxyFactory, front: RecordingFront
) -> None:
    proxy = make_proxy(allow=re.compile(r"/latest/meta-data/instance-id"))
    for _ in range(2):
        answer = await proxy.fetch("GET", "/latest/meta-data/instance-id", "")
        assert (answer.status, answer.body) == (200, b"i-fake")
    assert len(front.requests("GET")) == 2


async def test_errors_are_never_cached(make_proxy: ProxyFactory, front: RecordingFront) -> None:
    front.not_found.add(ZONE)
    proxy = make_proxy()
    assert (await proxy.fetch("GET", ZONE, "")).status == 404
    front.not_found.clear()
    assert (await proxy.fetch("GET", ZONE, "")).body == b"us-east-1a"


# -- construction and lifecycle -------------------------------------------------------------


@pytest.mark.parametrize("token_ttl", [0, -1, 21601])
def test_token_ttl_outside_imds_limits_is_refused(token_ttl: int) -> None:
    with pytest.raises(ValueError, match="token_ttl"):
        MetadataProxy(allow=DEFAULT_ALLOW, token_ttl=token_ttl)


async def test_a_session_handed_in_is_used_and_left_open(
    front: RecordingFront, front_url: str
) -> None:
    async with aiohttp.ClientSession() as session:
        proxy = MetadataProxy(front_url, allow=DEFAULT_ALLOW, session=session)
        assert (await proxy.fetch("GET", REGION, "")).status == 200
        await proxy.close()
        assert not session.closed


async def test_closed_proxy_can_be_closed_twice(make_proxy: ProxyFactory) -> None:
    proxy = make_proxy()
    assert (await proxy.fetch("GET", REGION, "")).status == 200
    await proxy.close()
    await proxy.close()
