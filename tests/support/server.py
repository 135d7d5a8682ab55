"""A real podiam server for tests, wired to the Kubernetes API test server, moto and real TLS."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from certs.tls import TlsFiles, channel_credentials
from protos import kiam_pb2, kiam_pb2_grpc
from server.app import PodiamServer
from server.config import parse_config
from server.identity import AWS_TIME_FORMAT, AwsCredentials
from tests.support.kubeapi import KubeApiServer
from tests.support.moto_sts import MotoSts, fake_session
from tests.support.tls import TlsDirs
from tests.support.waiting import eventually

BASE_ARN = "arn:aws:iam::123456789012:role/"


@dataclass
class Running:
    server: PodiamServer
    kube: KubeApiServer
    sts: MotoSts
    tls: TlsDirs
    target: str

    def channel(self, files: TlsFiles | None = None) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(self.target, channel_credentials(files or self.tls.agent))

    def stub(self, channel: grpc.aio.Channel) -> kiam_pb2_grpc.KiamServiceStub:
        return kiam_pb2_grpc.KiamServiceStub(channel)


def server_argv(
    *, kubeconfig: Path, sts: MotoSts, tls: TlsDirs, extra: list[str] | None = None
) -> list[str]:
    files = tls.server
    return [
        "--bind", "127.0.0.1:0",
        "--cert", str(files.cert),
        "--key", str(files.key),
        "--ca", str(files.ca),
        "--kubeconfig", str(kubeconfig),
        "--role-base-arn", BASE_ARN,
        "--region", "us-east-1",
        "--sts-endpoint", sts.endpoint_url,
        "--prometheus-listen-addr", "",
        *(extra or []),
    ]  # fmt: skip


@asynccontextmanager
async def running_server(
    kube: KubeApiServer, sts: MotoSts, tls: TlsDirs, tmp: Path, *, extra: list[str] | None = None
) -> AsyncIterator[Running]:
    kubeconfig = tmp / "kubeconfig"
    kube.write_kubeconfig(str(kubeconfig))
    config = parse_config(
        server_argv(kubeconfig=kubeconfig, sts=sts, tls=tls, extra=extra), environ={}
    )
    server = PodiamServer(config, boto_session=fake_session())
    try:
        await server.start()
        yield Running(server, kube, sts, tls, target=f"localhost:{server.port}")
    finally:
        await server.stop(grace=1)


async def indexed(podiam: Running, ip: str) -> None:
    """Until the server knows the pod at ``ip``."""
    await eventually(lambda: podiam.server.registry.lookup(ip).pod is not None)


async def refused(call) -> grpc.aio.AioRpcError:
    """The error a gRPC call that must fail failed with."""
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    return error.value


def as_aws(creds: kiam_pb2.Credentials) -> AwsCredentials:
    """Wire credentials as the AwsCredentials value, e.g. to call STS with them."""

    def parse(text: str) -> datetime:
        return datetime.strptime(text, AWS_TIME_FORMAT).replace(tzinfo=UTC)

    return AwsCredentials(
        access_key_id=creds.access_key_id,
        secret_access_key=creds.secret_access_key,
        token=creds.token,
        expiration=parse(creds.expiration),
        last_updated=parse(creds.last_updated),
    )
