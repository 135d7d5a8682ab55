"""Certificate rotation: new files on disk are picked up by the server and the agent without a
restart, and pods asking for credentials meanwhile are all answered."""

from __future__ import annotations

import asyncio
import shutil

import grpc
import pytest_asyncio

from certs.authority import generate_bundle, write_bundle
from certs.tls import TlsFiles, channel_credentials
from protos import kiam_pb2, kiam_pb2_grpc
from tests.support.agent import NODE, pod_session, running_agent
from tests.support.kubeapi import KubeApiServer
from tests.support.server import running_server
from tests.support.tls import TlsDirs
from tests.support.waiting import eventually

CREDS = "/latest/meta-data/iam/security-credentials/"
POD = "127.0.3.1"


@pytest_asyncio.fixture
async def rotating(moto_sts, tmp_path):
    live = tmp_path / "live"
    write_bundle(generate_bundle(), live)
    tls = TlsDirs(
        good=live, foreign=live,
        server=TlsFiles.server_in(live), agent=TlsFiles.agent_in(live),
        foreign_agent=TlsFiles.agent_in(live), foreign_server=TlsFiles.server_in(live),
    )  # fmt: skip
    async with KubeApiServer() as kube:
        kube.add_namespace("apps", annotations={"iam.amazonaws.com/permitted": ".*"})
        kube.add_pod("apps", "steady", ip=POD, host_ip=NODE,
                     annotations={"iam.amazonaws.com/role": "steady"})  # fmt: skip
        async with running_server(kube, moto_sts, tls, tmp_path) as podiam:
            async with running_agent(
                server_port=podiam.server.port, tls=tls, metadata=moto_sts.endpoint_url
            ) as agent:
                await asyncio.wait_for(agent.follower.synced_once.wait(), 15)
                yield podiam, agent, live


async def test_rotating_to_a_new_ca_under_load_drops_no_request(rotating, tmp_path):
    podiam, agent, live = rotating
    old = tmp_path / "old"
    shutil.copytree(live, old)
    statuses: list[int] = []
    stop = asyncio.Event()

    async def load() -> None:
        async with pod_session(POD) as http:
            while not stop.is_set():
                url = f"http://{NODE}:{agent.port}{CREDS}steady"
                async with http.get(url) as response:
                    statuses.append(response.status)
                await asyncio.sleep(0.005)

    loader = asyncio.create_task(load())
    await eventually(lambda: len(statuses) > 20)
    write_bundle(generate_bundle(), live, force=True)  # a new CA, server and agent certificate
    assert agent.connection.reload_if_changed()
    await eventually(lambda: agent.state.live and POD in agent.state.pods, timeout=15)
    settled = len(statuses)
    await eventually(lambda: len(statuses) > settled + 20)
    stop.set()
    await loader
    assert set(statuses) == {200}, f"{len(statuses)} requests: {sorted(set(statuses))}"

    # The server now speaks the new material: the old agent certificate is refused, the new
    # one accepted — without a restart.
    target = f"127.0.0.1:{podiam.server.port}"
    for files, works in ((TlsFiles.agent_in(old), False), (TlsFiles.agent_in(live), True)):
        async with grpc.aio.secure_channel(target, channel_credentials(files)) as channel:
            call = kiam_pb2_grpc.KiamServiceStub(channel).GetHealth(
                kiam_pb2.GetHealthRequest(), timeout=5
            )
            try:
                await call
                assert works
            except grpc.aio.AioRpcError as error:
                assert not works, error
                assert error.code() is grpc.StatusCode.UNAVAILABLE


async def test_half_written_files_keep_the_working_channel(rotating):
    _, agent, live = rotating
    (live / "agent.pem").write_text("-----BEGIN CERTIFICATE-----\ntruncated")
    assert not agent.connection.reload_if_changed()
    async with pod_session(POD) as http:
        async with http.get(f"http://{NODE}:{agent.port}{CREDS}steady") as response:
            assert response.status == 200
