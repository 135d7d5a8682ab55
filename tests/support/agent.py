"""A real podiam agent for tests, connected to a real server, and pods that call it.

On loopback every 127.x.y.z address is this machine's, so a "pod" is an HTTP client bound to its
own 127.0.1.x source address: the agent sees that address as the caller, exactly as it sees a
pod's IP behind the DNAT rule on a node.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp

from agent.app import PodiamAgent
from agent.config import parse_config
from tests.support.pods import NODE
from tests.support.tls import TlsDirs


def agent_argv(*, server_port: int, tls: TlsDirs, metadata: str, extra: list[str] | None = None):
    files = tls.agent
    return [
        "--host", NODE,
        "--port", "0",
        "--server-address", f"127.0.0.1:{server_port}",
        "--cert", str(files.cert),
        "--key", str(files.key),
        "--ca", str(files.ca),
        "--metadata-endpoint", metadata,
        "--prometheus-listen-addr", "127.0.0.1:0",
        *(extra or []),
    ]  # fmt: skip


@asynccontextmanager
async def running_agent(
    *, server_port: int, tls: TlsDirs, metadata: str, extra: list[str] | None = None
) -> AsyncIterator[PodiamAgent]:
    argv = agent_argv(server_port=server_port, tls=tls, metadata=metadata, extra=extra)
    agent = PodiamAgent(parse_config(argv, environ={}))
    try:
        await agent.start()
        yield agent
    finally:
        await agent.stop()


@asynccontextmanager
async def pod_session(ip: str) -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client whose requests come from ``ip``, as a pod's would."""
    connector = aiohttp.TCPConnector(local_addr=(ip, 0))
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=10)
    ) as session:
        yield session


async def raw_get(
    ip: str,
    port: int,
    raw_path: str,
    *,
    host: str = NODE,
    method: str = "GET",
    headers: str = "",
) -> tuple[int, str]:
    """Send ``raw_path`` (and ``headers``, CRLF-terminated lines) byte for byte, as an attacker
    would: HTTP clients normalise paths (resolving ``..``, decoding ``%72``) and refuse header
    values outside latin-1 before sending, which would hide what is being tested."""
    reader, writer = await asyncio.open_connection(host, port, local_addr=(ip, 0))
    try:
        request = (
            f"{method} {raw_path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{headers}"
            "Connection: close\r\n\r\n"
        )
        writer.write(request.encode())
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body.decode(errors="replace")
