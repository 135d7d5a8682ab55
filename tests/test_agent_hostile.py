"""Hostile input against the agent's pod-facing listener, over real sockets from loopback
source addresses (each one a pod): path tricks, smuggling forms, floods, slow headers, token
games, and a fixed-seed fuzz. Whatever a pod sends, the agent answers 4xx (never 5xx), never
hands out the node's credentials or user-data, never another pod's role, and keeps serving the
other pods.

The node's metadata service is a stand-in that answers every path with a marker (the
allow-listed region aside), so any leak of what lies behind the agent shows in a body.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import socket
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from aiohttp import web

from tests.support.agent import running_agent
from tests.support.pods import NODE, add_pod
from tests.support.waiting import eventually

CREDS = "/latest/meta-data/iam/security-credentials/"
REGION = "/latest/meta-data/placement/region"
IDENTITY = "/latest/dynamic/instance-identity/document"
SECRET = "NODE-SECRET"
TTL = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN = "X-aws-ec2-metadata-token"
LIMITS = [
    "--max-connections-per-ip", "16",
    "--header-timeout", "1s",
    "--keepalive-timeout", "2s",
    "--pod-requests-per-second", "200",
    "--pod-request-burst", "400",
    "--pod-wait", "0.2s",
]  # fmt: skip


@pytest.fixture(scope="module")
def namespaces():
    return {"apps": "app-.*"}


class NodeMetadata:
    """The node's own metadata service: region for the allow-list, a secret for the rest."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.paths.append(request.raw_path)
        if request.method == "PUT":
            return web.Response(text="upstream-token")
        if request.raw_path == REGION:
            return web.Response(text="us-east-1")
        if request.raw_path == IDENTITY:  # allow-listed too, by default
            return web.Response(text='{"region": "us-east-1"}')
        return web.Response(text=f"{SECRET} {request.raw_path}")


@pytest_asyncio.fixture(scope="module")
async def node_metadata() -> AsyncIterator[NodeMetadata]:
    node = NodeMetadata()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", node.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    node.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield node
    finally:
        await runner.cleanup()


@pytest_asyncio.fixture(scope="module")
async def strict(podiam, tls_dirs, node_metadata):
    """An agent with small limits, so that each can be reached quickly."""
    async with running_agent(
        server_port=podiam.server.port, tls=tls_dirs, metadata=node_metadata.url, extra=LIMITS
    ) as agent:
        await asyncio.wait_for(agent.follower.synced_once.wait(), 15)
        yield agent


@pytest_asyncio.fixture(scope="module")
async def pods(kube, strict) -> dict[str, str]:
    """Pod IP → role of a few pods with roles, all served from memory."""
    roles = {}
    for n in range(8):
        role = f"app-hostile-{n}"
        roles[add_pod(kube, "apps", f"hostile-{n}", role)] = role
    for ip, role in roles.items():
        await eventually(lambda ip=ip, role=role: strict.state.ready(ip), timeout=20)
    return roles


# ---- raw HTTP ---------------------------------------------------------------------------


RESET = b"<reset>"


async def read_or_reset(reader: asyncio.StreamReader) -> bytes:
    try:
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionError:  # reset, or the pipe broken under a write still in flight
        return RESET


def parse(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The responses in ``raw``, framed by Content-Length (all the agent's answers have one)."""
    answers = []
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        if not sep:
            raise AssertionError(f"unframed bytes: {raw[:200]!r}")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if status == 100:
            raw = rest
            continue
        length = int(headers.get("content-length", "0"))
        answers.append((status, headers, rest[:length]))
        raw = rest[length:]
    return answers


async def exchange(
    agent, ip: str, data: bytes, *, half_close: bool = True, seconds: float = 10
) -> bytes:
    """Send ``data`` from ``ip`` byte for byte and read until the agent closes."""
    reader, writer = await asyncio.open_connection(NODE, agent.port, local_addr=(ip, 0))
    try:
        try:
            writer.write(data)
            if half_close:
                writer.write_eof()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the agent answered and closed before it had read everything: read that
        return await asyncio.wait_for(reader.read(), seconds)
    except ConnectionError:
        return b""
    finally:
        writer.close()


def request(method: str, path: str, headers: str = "", *, close: bool = True) -> bytes:
    connection = "Connection: close\r\n" if close else ""
    return (
        f"{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{headers}{connection}\r\n".encode()
    )


async def one(agent, ip: str, data: bytes) -> tuple[int, dict[str, str], bytes]:
    answers = parse(await exchange(agent, ip, data))
    assert len(answers) == 1, answers
    return answers[0]


def assert_nothing_leaked(body: bytes) -> None:
    assert SECRET.encode() not in body and b"AccessKeyId" not in body, body[:300]


def first_pod(pods: dict[str, str], n: int = 0) -> tuple[str, str]:
    return list(pods.items())[n]


# ---- paths, targets, methods --------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/latest/meta-data/placement/../iam/security-credentials/",
        "/latest/meta-data/placement/region/../../../user-data",
        "/latest//user-data",
        "//latest/user-data",
        "/latest/meta-data/placement/%2e%2e/%2e%2e/user-data",
        "/latest/meta-data/placement%2f..%2f..%2fuser-data",
        "/latest/meta-data/placement/region%00",
        "/latest/meta-data/placement/region\x00/../../user-data",
        "/latest\\user-data",
        "/latest/meta-data/placement/region\\..\\..\\user-data",
        "/latest/meta-data\uff0fiam\uff0fsecurity-credentials\uff0f",
        "/latest/meta-data/placement\u2215..\u2215user-data",
        "/latest/meta-data/placement/\uff0e\uff0e/user-data",
        "/latest/" + "a/" * 3000,
        "/latest/user-data",
        "/latest/meta-data/iam/security-credentials-extended/",
        "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
        "http://169.254.169.254/latest/user-data",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "*",
        "169.254.169.254:80",
    ],
)
async def test_path_tricks_and_foreign_targets_never_reach_the_node(
    strict, pods, node_metadata, target
):
    ip, _ = first_pod(pods)
    before = len(node_metadata.paths)
    raw = (
        b"GET "
        + target.encode()
        + b" HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n"
    )
    status, _, body = await one(strict, ip, raw)
    assert status in (400, 404, 431), (status, body)
    assert_nothing_leaked(body)
    assert node_metadata.paths[before:] == []


async def test_connect_and_upgrade_are_refused_and_the_connection_closed(strict, pods):
    ip, _ = first_pod(pods)
    for raw in (
        b"CONNECT 169.254.169.254:80 HTTP/1.1\r\nHost: 169.254.169.254:80\r\n\r\n",
        b"GET /latest/user-data HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\n\r\nGET /latest/user-data HTTP/1.1\r\n\r\n",
    ):
        answers = parse(await exchange(strict, ip, raw, half_close=False))
        assert len(answers) == 1 and 400 <= answers[0][0] < 500, answers
        assert_nothing_leaked(answers[0][2])


@pytest.mark.parametrize(
    "method",
    ["get", "Get", "gEt", "POST", "DELETE", "TRACE", "PROPFIND", "M-SEARCH", "PURGE", "BREW"],
)
async def test_odd_and_lowercase_methods_are_4xx(strict, pods, method):
    ip, _ = first_pod(pods)
    status, _, body = await one(strict, ip, request(method, CREDS))
    assert status in (400, 405), (status, body)
    assert_nothing_leaked(body)


# ---- who is asking ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        "",  # no second Host (request() sends one)
        "Host: 169.254.169.254\r\n",
        "Host: evil.example\r\n",
        "Host: 169.254.169.254@evil.example\r\n",
        "Host: " + "h" * 4000 + "\r\n",
    ],
    ids=["plain", "two-hosts", "foreign-host", "userinfo-host", "long-host"],
)
async def test_host_header_games_change_nothing(strict, pods, headers):
    ip, role = first_pod(pods)
    status, _, body = await one(strict, ip, request("GET", CREDS, headers))
    assert (status, body) == (200, role.encode())


async def test_forwarding_headers_never_change_who_is_asking(strict, pods):
    (ip, role), (other, other_role) = first_pod(pods, 0), first_pod(pods, 1)
    spoofs = f"X-Forwarded-For: {other}\r\nForwarded: for={other}\r\nX-Real-IP: {other}\r\n"
    status, _, body = await one(strict, ip, request("GET", CREDS, spoofs))
    assert (status, body) == (200, role.encode())
    status, _, body = await one(strict, ip, request("GET", CREDS + other_role, spoofs))
    assert status == 404 and b"AccessKeyId" not in body
    # Real IMDS refuses token requests that went through a proxy; so does the agent.
    status, _, _ = await one(
        strict, ip, request("PUT", "/latest/api/token", f"{TTL}: 60\r\n{spoofs}")
    )
    assert status == 403


# ---- smuggling, pipelining, sizes ---------------------------------------------------------

HIDDEN = b"GET /latest/user-data HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    "raw",
    [
        # CL.TE and TE.CL: two framings at once.
        b"POST /latest/api/token HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + HIDDEN,
        b"POST /latest/api/token HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 4\r\n\r\n5c\r\n" + HIDDEN + b"\r\n0\r\n\r\n",
        # Obfuscated Transfer-Encoding.
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"
        + HIDDEN,
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n" + HIDDEN,
        # Two Content-Lengths, and a signed one.
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 44\r\n\r\n" + HIDDEN,
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: +44\r\n\r\n" + HIDDEN,
        # obs-fold and bare LF.
        b"GET /latest/meta-data/placement/region HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n"
        b" Content-Length: 44\r\n\r\n" + HIDDEN,
        b"GET /latest/meta-data/placement/region HTTP/1.1\nHost: x\n\n" + HIDDEN,
    ],
    ids=["cl-te", "te-cl", "te-list", "te-space", "two-cl", "signed-cl", "obs-fold", "bare-lf"],
)
async def test_smuggling_forms_are_refused_and_the_hidden_request_never_answered(
    strict, pods, node_metadata, raw
):
    ip, _ = first_pod(pods)
    before = len(node_metadata.paths)
    answers = parse(await exchange(strict, ip, raw, half_close=False))
    assert len(answers) == 1 and answers[0][0] == 400, answers
    assert "/latest/user-data" not in node_metadata.paths[before:]
    assert_nothing_leaked(answers[0][2])


async def test_pipelined_requests_are_answered_in_order(strict, pods):
    ip, role = first_pod(pods, 2)
    raw = b"".join(
        [
            request("GET", CREDS, close=False),
            request("PUT", "/latest/api/token", f"{TTL}: 60\r\n", close=False),
            request("GET", CREDS + role, close=False),
            request("GET", REGION, close=False),
            request("GET", "/latest/user-data", close=False),
            request("GET", "/ping", close=False),
            request("GET", CREDS, close=False),
            request("HEAD", CREDS + role, close=True),  # last: a HEAD answer has no body
        ]
    )
    answers = parse(await exchange(strict, ip, raw, half_close=False))
    statuses = [status for status, _, _ in answers]
    assert statuses == [200, 200, 200, 200, 404, 200, 200, 200], answers
    bodies = [body for _, _, body in answers]
    assert bodies[0] == bodies[6] == role.encode()
    assert b'"AccessKeyId"' in bodies[2] and bodies[3] == b"us-east-1" and bodies[5] == b"pong"
    assert bodies[7] == b"" and answers[7][1]["content-length"] == answers[2][1]["content-length"]


async def test_oversized_and_numerous_headers_are_431(strict, pods):
    ip, _ = first_pod(pods)
    big = request("GET", CREDS, "X-Big: " + "x" * 9000 + "\r\n")
    many = request("GET", CREDS, "".join(f"X-{n}: {n}\r\n" for n in range(150)))
    for raw in (big, many):
        status, _, body = await one(strict, ip, raw)
        assert status == 431, body
    # Headers that never end, in small pieces: cut once they pass the limit, not buffered on.
    reader, writer = await asyncio.open_connection(NODE, strict.port, local_addr=(ip, 0))
    writer.write(b"GET / HTTP/1.1\r\nX-Endless: ")
    try:
        for _ in range(64):
            writer.write(b"y" * 1024)
            await writer.drain()
            await asyncio.sleep(0.005)
    except ConnectionError:
        pass
    answer = await read_or_reset(reader)
    writer.close()
    # The 431, or a reset if the agent's close met bytes still arriving: never held open.
    assert answer.startswith(b"HTTP/1.1 431 ") or answer == RESET, answer[:100]


async def test_a_body_over_the_limit_is_413(strict, pods):
    ip, _ = first_pod(pods)
    raw = request("PUT", "/latest/api/token", f"{TTL}: 60\r\nContent-Length: 5000\r\n")
    status, _, _ = await one(strict, ip, raw + b"z" * 5000)
    assert status == 413


async def test_binary_header_values_are_answered_never_5xx(strict, pods):
    ip, _ = first_pod(pods)
    for extra in (b"Expect: \xff\xfe\r\n", b"X-aws-ec2-metadata-token: \xff\xc3\x28\r\n"):
        raw = (
            b"GET "
            + CREDS.encode()
            + b" HTTP/1.1\r\nHost: x\r\n"
            + extra
            + b"Connection: close\r\n\r\n"
        )
        status, _, body = await one(strict, ip, raw)
        assert status in (200, 401) and status < 500, body
    raw = request("PUT", "/latest/api/token", f"{TTL}: 60\r\nExpect: 100-continue\r\n")
    status, _, body = await one(strict, ip, raw)
    assert status == 200 and len(body) > 20


# ---- slow and idle connections ------------------------------------------------------------


async def test_slow_headers_are_cut_after_the_header_timeout(strict, pods):
    (ip, _), (victim, role) = first_pod(pods, 3), first_pod(pods, 4)
    reader, writer = await asyncio.open_connection(NODE, strict.port, local_addr=(ip, 0))
    writer.write(b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\n")
    started = asyncio.get_running_loop().time()
    closed = False
    try:
        for _ in range(40):  # one header byte every 0.2 s: never finishing
            writer.write(b"X")
            await writer.drain()
            await asyncio.sleep(0.2)
    except ConnectionError:
        closed = True
    answer = await read_or_reset(reader)
    waited = asyncio.get_running_loop().time() - started
    writer.close()
    assert closed or answer, "the slow request was never cut"
    assert answer.startswith(b"HTTP/1.1 408 ") or answer in (b"", RESET), answer[:100]
    assert waited < 8, "cut after its 1 s header timeout, not after the 8 s it kept sending"
    status, _, body = await one(strict, victim, request("GET", CREDS))
    assert (status, body) == (200, role.encode())


async def test_idle_keep_alive_connections_are_closed(strict, pods):
    ip, role = first_pod(pods, 5)
    reader, writer = await asyncio.open_connection(NODE, strict.port, local_addr=(ip, 0))
    writer.write(request("GET", CREDS, close=False))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(re.search(rb"Content-Length: (\d+)", head)[1])
    assert await reader.readexactly(length) == role.encode()
    # Idle past --keepalive-timeout (2 s): the agent closes it.
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()


async def test_a_connection_flood_from_one_pod_leaves_the_others_served(strict, pods):
    (flooder, _), (victim, role) = first_pod(pods, 6), first_pod(pods, 7)
    open_ = []
    for _ in range(200):
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((flooder, 0))
        try:
            sock.connect((NODE, strict.port))
        except BlockingIOError:
            pass
        open_.append(sock)
    try:
        await asyncio.sleep(0.5)
        alive = 0
        for sock in open_:
            try:
                sock.recv(1)  # b"": closed by the agent
            except BlockingIOError:
                alive += 1  # still open, nothing to read
            except OSError:
                pass  # reset by the agent
        assert alive <= 16, f"{alive} connections from one pod kept open; the limit is 16"
        assert strict.http.per_ip.get(flooder, 0) <= 16
        for _ in range(5):
            assert (await one(strict, victim, request("GET", CREDS)))[2] == role.encode()
    finally:
        for sock in open_:
            sock.close()
    assert 'limit="connections-per-ip"' in await metrics_text(strict)


# ---- tokens -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ttl", "expected"),
    [
        (b"1", 200), (b"21600", 200), (b" 60 ", 200), (b"00060", 200),
        (b"0", 400), (b"21601", 400), (b"-1", 400), (b"+60", 400), (b"6e1", 400),
        (b"0x10", 400), (b"60.0", 400), (b"000060", 400), (b"9" * 40, 400), (b"", 400),
        ("²".encode(), 400), ("①".encode(), 400), ("١٢".encode(), 400),
        ("\uff16\uff10".encode(), 400), (b"\xff", 400),
    ],
)  # fmt: skip
async def test_token_ttl_edge_cases_are_400_never_5xx(strict, pods, ttl, expected):
    ip, _ = first_pod(pods)
    raw = b"PUT /latest/api/token HTTP/1.1\r\nHost: x\r\n" + TTL.encode() + b": " + ttl
    status, headers, _ = await one(strict, ip, raw + b"\r\nConnection: close\r\n\r\n")
    assert status == expected
    if status == 200:
        assert headers[TTL.lower()] == str(int(ttl.strip()))


async def test_replayed_and_bit_flipped_tokens_are_401(strict, pods):
    (ip, role), (other, _) = first_pod(pods, 0), first_pod(pods, 1)
    _, _, token = await one(strict, ip, request("PUT", "/latest/api/token", f"{TTL}: 300\r\n"))
    good = await one(strict, ip, request("GET", CREDS, f"{TOKEN}: {token.decode()}\r\n"))
    assert good[0] == 200 and good[2] == role.encode()
    forged = [token]  # replayed by another pod
    raw = bytearray(token)
    for position in (0, len(raw) // 2, len(raw) - 2):
        flipped = bytearray(raw)
        flipped[position] ^= 0x01
        forged.append(bytes(flipped))
    forged += [token[:-4], token + b"AAAA", b"", b"!!!!", token.lower(), b"\xc3\xa9" + token]
    for n, bad in enumerate(forged):
        caller = other if n == 0 else ip
        raw = request("GET", CREDS + role, "").replace(
            b"Connection: close", TOKEN.encode() + b": " + bad + b"\r\nConnection: close"
        )
        status, _, body = await one(strict, caller, raw)
        assert status in (400, 401) and b"AccessKeyId" not in body, (bad, status)


# ---- fair share ---------------------------------------------------------------------------


async def test_a_pod_over_its_fair_share_gets_429_with_retry_after(strict, kube):
    greedy = add_pod(kube, "apps", "greedy", "app-greedy")
    calm = add_pod(kube, "apps", "calm", "app-calm")
    for ip in (greedy, calm):
        await eventually(lambda ip=ip: strict.state.ready(ip), timeout=20)
    # 1,000 pipelined requests at once: the burst (400) is answered, the rest told to wait.
    raw = request("GET", CREDS, close=False) * 999 + request("GET", CREDS)
    answers = parse(await exchange(strict, greedy, raw, half_close=False, seconds=20))
    statuses = Counter(status for status, _, _ in answers)
    assert statuses[200] >= 400 and statuses[429] > 0 and set(statuses) == {200, 429}, statuses
    refused = next(headers for status, headers, _ in answers if status == 429)
    assert int(refused["retry-after"]) >= 1
    # Another pod is not affected by the first one's bucket.
    assert (await one(strict, calm, request("GET", CREDS)))[0] == 200
    assert 'limit="pod-rate"' in await metrics_text(strict)


# ---- accept errors ------------------------------------------------------------------------

EMFILE_SERVER = textwrap.dedent(
    """
    import asyncio, os, resource, sys
    from agent import listener, wire
    from agent.httpserver import HttpListener
    from agent.limits import ListenerLimits

    class Ok:
        def immediate(self, method, target, headers, ip):
            return wire.text("ok")
        async def respond(self, request):
            return wire.text("ok")

    async def main():
        http = HttpListener(Ok(), ListenerLimits(connections_per_ip=1000))
        sock = listener.bind("127.0.0.1", 0)
        http.serve(sock)
        # Other work holds descriptors up to the limit: accepting fails with EMFILE.
        used = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (used + 5, resource.getrlimit(
            resource.RLIMIT_NOFILE)[1]))
        print(sock.getsockname()[1], flush=True)
        await asyncio.sleep(float(sys.argv[1]))

    import uvloop
    uvloop.run(main())
    """
)


async def test_accept_errors_back_off_and_are_logged_once(tmp_path):
    process = subprocess.Popen(  # noqa: ASYNC220 - read from threads below
        [sys.executable, "-c", EMFILE_SERVER, "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=os.getcwd(),
    )  # fmt: skip
    try:
        port = int(await asyncio.to_thread(process.stdout.readline))
        clients = []
        for _ in range(40):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=2))
        await asyncio.sleep(2)  # several back-off rounds while descriptors stay exhausted
        for client in clients:
            client.close()
        # Descriptors free again: the listener accepts and answers. The 40 closed connections
        # are still queued ahead of this one and are accepted and dropped first; a connection
        # that arrives while they hold the few descriptors may be reset by the total cap, so the
        # client asks again, as a pod's SDK would, within a deadline.
        answer = await _ask_until_answered(port, deadline=30)
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"ok")
    finally:
        # Draining the stale queue takes a few 0.5 s back-off rounds (slower on a busy machine):
        # the server lives long enough for that, and is stopped once it has answered.
        process.terminate()
        _, err = await asyncio.to_thread(process.communicate, timeout=20)
    lines = [line for line in err.decode().splitlines() if "cannot accept" in line]
    assert len(lines) == 1, err.decode()[-2000:]
    assert "Traceback" not in err.decode()


async def _ask_until_answered(port: int, *, deadline: float) -> bytes:
    loop = asyncio.get_running_loop()
    until = loop.time() + deadline
    while True:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), max(0.1, until - loop.time()))
            writer.close()
            if answer:
                return answer
        except (ConnectionResetError, ConnectionRefusedError):
            pass
        if loop.time() >= until:
            return b""
        await asyncio.sleep(0.2)


# ---- fuzz ---------------------------------------------------------------------------------

FUZZ_REQUESTS = 20_000
FUZZ_SEED = 20151


def _fuzz_requests(rng: random.Random, pods: dict[str, str], token: bytes) -> list[bytes]:
    roles = list(pods.values())
    paths = [
        CREDS, CREDS.rstrip("/"), REGION, "/latest/user-data", "/latest/meta-data/",
        "/latest/meta-data/iam/info", "/latest/api/token", "/ping", "/health?deep=1",
        "/latest/dynamic/instance-identity/document",
        "/latest/meta-data/iam/security-credentials-extended/x",
    ] + [CREDS + role for role in roles]  # fmt: skip
    methods = ["GET", "GET", "GET", "PUT", "HEAD", "POST", "get", "CONNECT", "OPTIONS", "GE T"]
    pieces = [
        b"..", b"/", b"//", b"%2e", b"%2f", b"%00", b"\\", b"\x00", b"\r", b"\n", b"\r\n", b" ",
        b"?", b"#", b";", b"\xef\xbc\x8f", b"\xc0\xae", b"%", b"*", b"@", b":", b"\t", b"\xff",
    ]  # fmt: skip
    headers = [
        f"{TTL}: 60", f"{TTL}: ²", f"{TTL}: 0", f"{TOKEN}: " + token.decode(), f"{TOKEN}: AAAA",
        "X-Forwarded-For: 10.0.0.1", "Transfer-Encoding: chunked", "Content-Length: 5",
        "Content-Length: -1", "Expect: 100-continue", "Connection: keep-alive", "Host:",
        "Upgrade: h2c", "X-Long: " + "L" * 9000,
    ]  # fmt: skip
    out = []
    for _ in range(FUZZ_REQUESTS):
        method = rng.choice(methods)
        path = rng.choice(paths).encode()
        if rng.random() < 0.6:
            at = rng.randrange(len(path) + 1)
            path = path[:at] + rng.choice(pieces) + path[at:]
        lines = [
            f"{method} ".encode()
            + path
            + rng.choice([b" HTTP/1.1", b" HTTP/1.0", b" HTTP/9.9", b""])
        ]
        lines.append(b"Host: 169.254.169.254")
        for _ in range(rng.randrange(3)):
            lines.append(rng.choice(headers).encode())
        lines.append(b"Connection: close")
        raw = b"\r\n".join(lines) + b"\r\n\r\n"
        if rng.random() < 0.3:
            raw += rng.choice([b"hello", b"0\r\n\r\n", b"GET /latest/user-data HTTP/1.1\r\n\r\n"])
        if rng.random() < 0.25:  # flip a few bytes anywhere
            mutable = bytearray(raw)
            for _ in range(rng.randrange(1, 4)):
                mutable[rng.randrange(len(mutable))] = rng.randrange(256)
            raw = bytes(mutable)
        if rng.random() < 0.05:
            raw = raw[: rng.randrange(len(raw))]  # cut short
        out.append(raw)
    return out


@pytest.mark.timeout(600)
async def test_fixed_seed_fuzz_never_leaks_never_5xx_and_the_agent_keeps_serving(
    strict, pods, node_metadata
):
    token_ip, _ = first_pod(pods)
    _, _, token = await one(
        strict, token_ip, request("PUT", "/latest/api/token", f"{TTL}: 600\r\n")
    )
    errors_before = server_errors(await metrics_text(strict))
    rng = random.Random(FUZZ_SEED)
    requests = _fuzz_requests(rng, pods, token)
    # Pods only: a caller that is no pod waits for the server's unary answer, which in this
    # one-process test shares the event loop with 48 fuzzing clients and may miss --pod-wait.
    sources = list(pods)
    statuses: Counter[int] = Counter()
    leaks: list[bytes] = []
    queue = asyncio.Queue()
    for n, raw in enumerate(requests):
        queue.put_nowait((sources[n % len(sources)], raw))

    async def worker() -> None:
        while not queue.empty():
            ip, raw = queue.get_nowait()
            try:
                answer = await exchange(strict, ip, raw, seconds=15)
            except (ConnectionError, TimeoutError):
                statuses[0] += 1
                continue
            for status in re.findall(rb"^HTTP/1\.1 (\d{3}) ", answer, re.MULTILINE):
                statuses[int(status)] += 1
            if SECRET.encode() in answer:
                leaks.append(raw)
            if b'"AccessKeyId"' in answer:
                # Credentials only ever go to the pod whose role they are, on its own path.
                if ip not in pods or CREDS.encode() + pods[ip].encode() not in raw:
                    leaks.append(raw)

    await asyncio.gather(*(worker() for _ in range(48)))
    print(f"fuzz: {FUZZ_REQUESTS} requests, statuses {sorted(statuses.items())}")
    assert leaks == [], leaks[:5]
    assert not [s for s in statuses if s >= 500], statuses
    assert sum(statuses.values()) >= FUZZ_REQUESTS * 0.9, statuses
    upstream = set(node_metadata.paths)
    assert upstream <= {REGION, IDENTITY, "/latest/api/token"}
    # Still serving every pod, and nothing left behind.
    for ip, role in pods.items():
        assert (await one(strict, ip, request("GET", CREDS)))[2] == role.encode()
    await eventually(lambda: len(strict.http.connections) == 0, timeout=10)
    # The agent counted no 5xx either (the registry is the process's: compare, not absolute).
    assert server_errors(await metrics_text(strict)) == errors_before


def server_errors(metrics: str) -> float:
    pattern = r'^podiam_agent_requests_total\{route="[^"]+",status="5\d\d"\} (\S+)$'
    return sum(float(value) for value in re.findall(pattern, metrics, re.MULTILINE))


async def metrics_text(agent) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", agent.metrics_port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    text = (await asyncio.wait_for(reader.read(), 10)).decode()
    writer.close()
    return text
