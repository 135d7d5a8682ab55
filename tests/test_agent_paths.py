"""Request path safety: what real SDKs send is accepted unchanged, anything ambiguous is refused.

The table tests `canonical_path` directly; the last tests put it behind a real aiohttp server
and send raw request lines over a socket, because aiohttp's own client would normalise the very
paths that matter (and because the guarantee is only as good as ``request.raw_path``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from agent.paths import MAX_PATH_LENGTH, PathRejected, canonical_path

CREDS = "/latest/meta-data/iam/security-credentials/"

ACCEPTED = [
    "/",
    "/latest",
    "/latest/",
    "/latest/api/token",
    "/latest/meta-data/",
    CREDS,
    CREDS + "my-role",
    CREDS + "My_Role+=,.@-1",
    "/latest/meta-data/iam/security-credentials-extended/my-role",
    "/latest/meta-data/iam/info",
    "/latest/meta-data/placement/region",
    "/latest/meta-data/placement/availability-zone",
    "/latest/dynamic/instance-identity/document",
    "/latest/meta-data/network/interfaces/macs/0e:49:61:0f:c3:11/vpc-id",
    "/latest/meta-data/iam/security-credentials/a..b",
    "/latest/meta-data/iam/security-credentials/.hidden",
    "/latest/meta-data/iam/security-credentials/role.",
    "/" + "a" * (MAX_PATH_LENGTH - 1),
]

REJECTED = [
    # dot segments, literal
    (CREDS + "../info", "dot-segment"),
    ("/latest/./meta-data", "dot-segment"),
    ("/latest/meta-data/.", "dot-segment"),
    ("/latest/meta-data/./", "dot-segment"),
    ("/latest/meta-data/..", "dot-segment"),
    ("/..", "dot-segment"),
    ("/.", "dot-segment"),
    ("/latest/meta-data/placement/region/../../iam/security-credentials/", "dot-segment"),
    ("/latest/.../meta-data", "dot-segment"),
    # empty segments
    ("/latest/meta-data//iam/security-credentials/", "empty-segment"),
    ("//latest/meta-data", "empty-segment"),
    ("//", "empty-segment"),
    ("/latest/meta-data/iam/security-credentials//", "empty-segment"),
    ("/latest//", "empty-segment"),
    # encoded separators, dots and percent signs, in either case
    (CREDS + "%2e%2e/", "encoded-dot"),
    (CREDS + "%2E%2E/info", "encoded-dot"),
    ("/latest/meta-data/placement/region%2f..", "encoded-separator"),
    ("/latest/meta-data/placement/region%2F..%2Fiam", "encoded-separator"),
    ("/latest%5cmeta-data", "encoded-separator"),
    ("/latest%5Cmeta-data", "encoded-separator"),
    (CREDS + "%252e%252e/", "double-encoding"),
    ("/latest/meta-data/%25", "double-encoding"),
    # any other escape, including overlong UTF-8 dots and encoded lookalikes
    ("/latest/meta-data/iam/security-credentials/%c0%ae%c0%ae/", "percent-encoding"),
    ("/latest/meta-data/%ef%bc%8fiam", "percent-encoding"),
    ("/latest/meta-data/iam%20info", "percent-encoding"),
    ("/latest/meta-data/%41", "percent-encoding"),
    ("/latest/meta-data/%00", "percent-encoding"),
    ("/latest/meta-data/%", "percent-encoding"),
    ("/latest/meta-data/%zz", "percent-encoding"),
    # backslashes
    ("/latest\\meta-data", "backslash"),
    ("\\latest/meta-data", "not-absolute"),
    (CREDS + "..\\info", "backslash"),
    # control characters, whitespace, other punctuation
    ("/latest/meta-data/\x00", "bad-characters"),
    ("/latest/meta-data/iam\x00/info", "bad-characters"),
    ("/latest/meta-data/\x1f", "bad-characters"),
    ("/latest/meta-data/\x7f", "bad-characters"),
    ("/latest/meta-data/\t", "bad-characters"),
    ("/latest/meta-data/\r\nX-Injected: 1", "bad-characters"),
    ("/latest/meta-data/ iam", "bad-characters"),
    ("/latest/meta-data/placement/region;x=1", "bad-characters"),
    ("/latest/meta-data/placement/region?x=1", "bad-characters"),
    ("/latest/meta-data/placement/region#frag", "bad-characters"),
    ("/latest/meta-data/~", "bad-characters"),
    ("/latest/meta-data/'", "bad-characters"),
    ('/latest/meta-data/"', "bad-characters"),
    ("/latest/meta-data/<x>", "bad-characters"),
    # non-ASCII, Unicode lookalikes of "/" and "."
    ("/latest/meta-data\uff0fiam", "non-ascii"),  # fullwidth solidus
    ("/latest/meta-data\u2215iam", "non-ascii"),  # division slash
    ("/latest/meta-data\u2044iam", "non-ascii"),  # fraction slash
    (CREDS + "\u2025/info", "non-ascii"),  # two dot leader
    (CREDS + "\u2024\u2024/info", "non-ascii"),  # one dot leader x2
    (CREDS + "\uff0e\uff0e/info", "non-ascii"),  # fullwidth full stop x2
    ("/latest/meta-d\u0430ta/", "non-ascii"),  # Cyrillic a
    ("/latest/meta-data/\udcc0\udcae", "non-ascii"),  # surrogate-escaped raw bytes
    ("/latest/meta-data/\u00a0", "non-ascii"),  # no-break space
    # not starting with "/"
    ("", "not-absolute"),
    ("latest/meta-data", "not-absolute"),
    ("*", "not-absolute"),
    ("http://169.254.169.254/latest/meta-data/", "not-absolute"),
    # too long
    ("/" + "a" * MAX_PATH_LENGTH, "too-long"),
    ("/latest/" + "x/" * 10_000, "too-long"),
]


@pytest.mark.parametrize("path", ACCEPTED)
def test_paths_real_sdks_send_are_returned_unchanged(path: str) -> None:
    assert canonical_path(path) == path


@pytest.mark.parametrize(("path", "reason"), REJECTED)
def test_ambiguous_paths_are_refused_with_a_reason(path: str, reason: str) -> None:
    with pytest.raises(PathRejected) as caught:
        canonical_path(path)
    assert caught.value.reason == reason
    assert str(caught.value)  # a message for the 4xx body


@pytest.mark.parametrize(("path", "reason"), REJECTED)
def test_refusal_message_never_echoes_the_path(path: str, reason: str) -> None:
    with pytest.raises(PathRejected) as caught:
        canonical_path(path)
    message = str(caught.value)
    assert message.isascii()
    assert "\n" not in message
    if len(path) > 3:
        assert path not in message


def test_one_trailing_slash_is_kept_and_meaningful() -> None:
    assert canonical_path(CREDS) == CREDS
    assert canonical_path(CREDS.rstrip("/")) == CREDS.rstrip("/")
    with pytest.raises(PathRejected):
        canonical_path(CREDS + "/")


def test_max_path_length_is_documented_and_generous() -> None:
    # Longest real path: the credentials path with a 64-character role name.
    assert len(CREDS + "r" * 64) < MAX_PATH_LENGTH <= 8190


# -- behind a real aiohttp server -----------------------------------------------------------


@pytest.fixture(scope="module")
async def raw_server() -> AsyncIterator[int]:
    """An aiohttp server that answers 200 with the canonical path, or 400 with the reason."""

    async def handler(request: web.Request) -> web.Response:
        try:
            path = canonical_path(request.raw_path.partition("?")[0])
        except PathRejected as exc:
            return web.Response(status=400, text=exc.reason)
        return web.Response(text=path)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def send_raw(port: int, target: bytes) -> tuple[int, bytes]:
    """Send one request line exactly as given; return the status and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: 169.254.169.254\r\n")
        writer.write(b"Connection: close\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout=5)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        (b"/latest/meta-data/iam/security-credentials/../info", b"dot-segment"),
        (b"/latest/meta-data//iam/security-credentials/", b"empty-segment"),
        (b"//latest/meta-data/iam/security-credentials/", b"empty-segment"),
        (b"/latest/meta-data/iam/security-credentials/%2e%2e/", b"encoded-dot"),
        (b"/latest/meta-data/placement/region%2f..", b"encoded-separator"),
        (b"/latest/meta-data/placement/region%2F..%2Fiam%2Finfo?x=1", b"encoded-separator"),
        (b"/latest/./meta-data", b"dot-segment"),
        (b"/latest/meta-data/%00", b"percent-encoding"),
        (b"/latest\\meta-data", b"backslash"),
        (b"/latest/meta-data/placement/region#/../../iam", b"bad-characters"),
        (b"http://169.254.169.254/latest/meta-data/iam/info", b"not-absolute"),
    ],
)
async def test_raw_request_paths_are_checked_as_sent_not_as_decoded(
    raw_server: int, target: bytes, reason: bytes
) -> None:
    status, body = await send_raw(raw_server, target)
    assert (status, body) == (400, reason)


async def test_non_ascii_request_line_never_reaches_the_handler(raw_server: int) -> None:
    # aiohttp's parser refuses raw non-ASCII bytes itself; canonical_path is the second line.
    status, _ = await send_raw(raw_server, "/latest/meta-data\uff0fiam".encode())
    assert status == 400


@pytest.mark.parametrize(
    "target",
    [
        b"/latest/meta-data/iam/security-credentials/",
        b"/latest/meta-data/iam/security-credentials/my-role",
        b"/latest/meta-data/placement/region",
    ],
)
async def test_raw_request_paths_from_sdks_pass_unchanged(raw_server: int, target: bytes) -> None:
    assert await send_raw(raw_server, target) == (200, target)
    assert await send_raw(raw_server, target + b"?x=1&y=%2f..") == (200, target)
