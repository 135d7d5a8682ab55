"""Shutting a server down: agents' node streams end cleanly at once, so they reconnect to
another replica instead of hanging on until the grace period runs out."""

from __future__ import annotations

import asyncio

import grpc

from certs.tls import channel_credentials
from protos import kiam_pb2, kiam_pb2_grpc
from server.app import PodiamServer
from server.config import parse_config
from tests.support.kubeapi import KubeApiServer
from tests.support.moto_sts import fake_session
from tests.support.server import server_argv


async def test_shutdown_ends_node_streams_cleanly_without_waiting_for_the_grace_period(
    moto_sts, tls_dirs, tmp_path
):
    async with KubeApiServer() as kube:
        kube.add_namespace("apps", annotations={"iam.amazonaws.com/permitted": ".*"})
        kubeconfig = tmp_path / "kubeconfig"
        kube.write_kubeconfig(str(kubeconfig))
        argv = server_argv(kubeconfig=kubeconfig, sts=moto_sts, tls=tls_dirs)
        server = PodiamServer(parse_config(argv, environ={}), boto_session=fake_session())
        await server.start()
        target = f"localhost:{server.port}"
        async with grpc.aio.secure_channel(target, channel_credentials(tls_dirs.agent)) as ch:
            stream = kiam_pb2_grpc.KiamServiceStub(ch).WatchNode(kiam_pb2.WatchNodeRequest())
            first = await stream.read()
            assert first.reset and first.synced
            # A long grace: the stream must not be what the shutdown waits for.
            stopping = asyncio.create_task(server.stop(grace=60))
            assert await stream.read() is grpc.aio.EOF
            assert await stream.code() is grpc.StatusCode.OK
            await asyncio.wait_for(stopping, 30)
