"""The fixtures every test module shares (tests/conftest.py loads this module as a plugin): the
Kubernetes API test server, a podiam server on it, a gRPC stub and an agent for that server, and
the STS side (moto, reset per test, and a gateway to it).

The real components start once per module. A module says what it needs by overriding the small
fixtures they are built from: ``namespaces`` (the API server's namespaces and what each permits)
and ``server_flags`` (extra podiam-server flags). Tests that change the API server itself
(compaction, dropped watches, request counts) take ``fresh_kube``, a new one per test.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from agent.app import PodiamAgent
from protos import kiam_pb2_grpc
from server.sts import StsGateway
from tests.support.agent import running_agent
from tests.support.kubeapi import KubeApiServer
from tests.support.moto_sts import REGION, MotoSts, fake_session
from tests.support.objects import PERMITTED
from tests.support.server import Running, running_server
from tests.support.tls import TlsDirs


@pytest.fixture(scope="module")
def namespaces() -> dict[str, str | None]:
    """The namespaces ``kube`` starts with: name → its permitted-roles regex (None: none)."""
    return {"default": None}


@pytest.fixture(scope="module")
def server_flags() -> list[str]:
    """Extra podiam-server flags for ``podiam``."""
    return []


def _add_namespaces(kube: KubeApiServer, namespaces: dict[str, str | None]) -> None:
    for name, permitted in namespaces.items():
        kube.add_namespace(name, annotations=None if permitted is None else {PERMITTED: permitted})


@pytest_asyncio.fixture(scope="module")
async def kube(namespaces: dict[str, str | None]) -> AsyncIterator[KubeApiServer]:
    """The module's Kubernetes API test server, with ``namespaces``."""
    async with KubeApiServer() as kube:
        _add_namespaces(kube, namespaces)
        yield kube


@pytest_asyncio.fixture
async def fresh_kube() -> AsyncIterator[KubeApiServer]:
    """A Kubernetes API test server of the test's own, with the namespace ``default``."""
    async with KubeApiServer() as kube:
        _add_namespaces(kube, {"default": None})
        yield kube


@pytest_asyncio.fixture(scope="module")
async def podiam(
    kube: KubeApiServer,
    moto_sts: MotoSts,
    tls_dirs: TlsDirs,
    tmp_path_factory: pytest.TempPathFactory,
    server_flags: list[str],
) -> AsyncIterator[Running]:
    """A podiam server in this process, watching ``kube`` and assuming roles in moto."""
    tmp = tmp_path_factory.mktemp("podiam")
    async with running_server(kube, moto_sts, tls_dirs, tmp, extra=server_flags) as run:
        yield run


@pytest_asyncio.fixture(scope="module")
async def stub(podiam: Running) -> AsyncIterator[kiam_pb2_grpc.KiamServiceStub]:
    """A gRPC stub for ``podiam``, with the agent's certificate."""
    channel = podiam.channel()
    try:
        yield podiam.stub(channel)
    finally:
        await channel.close()


@pytest_asyncio.fixture(scope="module")
async def agent(
    podiam: Running, moto_sts: MotoSts, tls_dirs: TlsDirs
) -> AsyncIterator[PodiamAgent]:
    """A podiam agent in this process, following ``podiam``'s node stream, entered once the
    stream's first snapshot arrived; moto stands in for the node's metadata service."""
    async with running_agent(
        server_port=podiam.server.port, tls=tls_dirs, metadata=moto_sts.endpoint_url
    ) as agent:
        await asyncio.wait_for(agent.follower.synced_once.wait(), 15)
        yield agent


@pytest.fixture
def sts(moto_sts: MotoSts) -> Iterator[MotoSts]:
    """The module's moto, with no AssumeRole calls counted and no failures set."""
    moto_sts.reset()
    yield moto_sts
    moto_sts.reset()


@pytest.fixture(scope="module")
def gateway(moto_sts: MotoSts) -> Iterator[StsGateway]:
    """An STS gateway to the module's moto."""
    gateway = StsGateway(
        region=REGION, endpoint_url=moto_sts.endpoint_url, boto_session=fake_session()
    )
    yield gateway
    gateway.close()
