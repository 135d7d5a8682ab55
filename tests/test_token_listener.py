"""The token-bound credentials endpoint on its own pod-facing listener (agent/httpserver.py with
agent/container_credentials.py as its route table): a real server (token credentials off, so
every token that reaches it is answered ``token-credentials-off``) and a real agent. What
tokens the real TokenReview accepts, and the hot path: tests/test_token_credentials.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest_asyncio

from tests.support.agent import raw_get, running_agent
from tests.support.pods import NODE

POD = "127.0.1.77"


@pytest_asyncio.fixture(scope="module")
async def agent(podiam, moto_sts, tls_dirs):
    # A header limit far below a token's size: the token listener must still take any token
    # the endpoint accepts.
    flags = ["--token-endpoint", "--token-port", "0", "--max-header-bytes", "1024"]
    async with running_agent(
        server_port=podiam.server.port, tls=tls_dirs, metadata=moto_sts.endpoint_url, extra=flags
    ) as agent:
        await asyncio.wait_for(agent.streams.synced_once.wait(), 15)
        yield agent


async def ask(agent, path: str = "/v1/credentials", *, token: str | None = None, method="GET"):
    headers = "" if token is None else f"Authorization: {token}\r\n"
    status, body = await raw_get(
        POD, agent.token_port, path, host=NODE, method=method, headers=headers
    )
    return status, json.loads(body)


async def test_a_16_kib_token_reaches_the_server_whatever_the_header_limit(agent):
    status, body = await ask(agent, token="t" * (16 * 1024))
    assert (status, body["code"]) == (501, "token-credentials-off"), body


async def test_a_bearer_token_reaches_the_server_too(agent):
    status, body = await ask(agent, token="Bearer " + "t" * 1500)
    assert (status, body["code"]) == (501, "token-credentials-off"), body


async def test_a_token_longer_than_the_endpoint_takes_is_refused_as_json(agent):
    status, body = await ask(agent, token="t" * (16 * 1024 + 1))
    assert (status, body["code"]) == (401, "token-required"), body


async def test_other_paths_and_methods_are_refused_as_json(agent):
    assert (await ask(agent, "/latest/meta-data/", token="t"))[1]["code"] == "blocked-path"
    status, body = await ask(agent, token="t", method="DELETE")
    assert (status, body["code"]) == (405, "bad-method"), body


async def test_the_metadata_api_keeps_its_own_header_limit(agent):
    headers = f"X-Padding: {'p' * 2000}\r\n"
    status, _ = await raw_get(POD, agent.port, "/latest/meta-data/", headers=headers)
    assert status == 431


async def test_refusals_on_the_token_listener_are_counted_under_its_route(agent):
    await ask(agent)
    metrics = await _metrics(agent)
    assert 'podiam_agent_requests_total{route="container-credentials",status="401"}' in metrics


async def _metrics(agent) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", agent.metrics_port)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return (await asyncio.wait_for(reader.read(), 10)).decode()
    finally:
        writer.close()
