"""The baseline for podiam-server's unary RPC: a bare grpc.aio servicer answering
GetPodCredentials with a fixed message — the bytes podiam answered with — over the same mutual
TLS (the same certificate files, reloadable, as podiam-server serves them), and nothing else.

    python -m bench.grpcbare --port N --tls DIR --answer-file F    # prints "listening"
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import grpc

from certs.tls import TlsFiles, server_credentials
from protos import kiam_pb2, kiam_pb2_grpc


class Bare(kiam_pb2_grpc.KiamServiceServicer):
    def __init__(self, answer: kiam_pb2.Credentials) -> None:
        self._answer = answer

    async def GetPodCredentials(self, request, context) -> kiam_pb2.Credentials:
        return self._answer


async def serve(port: int, tls: Path, answer: kiam_pb2.Credentials) -> None:
    server = grpc.aio.server()
    kiam_pb2_grpc.add_KiamServiceServicer_to_server(Bare(answer), server)
    server.add_secure_port(
        f"127.0.0.1:{port}", server_credentials(TlsFiles.server_in(tls), reload=True)
    )
    await server.start()
    print("listening", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tls", type=Path, required=True)
    parser.add_argument("--answer-file", type=Path, required=True)
    args = parser.parse_args()
    answer = kiam_pb2.Credentials.FromString(args.answer_file.read_bytes())
    asyncio.run(serve(args.port, args.tls, answer))


if __name__ == "__main__":
    main()
