"""The local demo (`make demo`): podiam on one machine with everything embedded.

Starts moto as STS, the Kubernetes API test server with a namespace that permits `app-.*` and
two annotated pods, and a podiam server with freshly generated certificates; then asks, as an
agent on the pods' node would, for each pod's credentials. The permitted pod gets credentials
that STS recognises as its role; the forbidden one is refused with the reason. Then it all shuts
down. (The agent joins the demo when it is built.)
"""

from __future__ import annotations

import asyncio
import logging
import sys
import tempfile
from pathlib import Path

import grpc

from protos import kiam_pb2
from server import logs
from tests.kubeapi import KubeApiServer
from tests.support.moto_sts import MotoSts, caller_arn
from tests.support.server import as_aws, running_server
from tests.support.tls import make_tls_dirs

NODE = "127.0.0.1"
PODS = [
    ("web", "10.0.0.11", "app-web"),  # permitted by the namespace
    ("intruder", "10.0.0.12", "admin"),  # not permitted
]


def say(text: str) -> None:
    print(text, flush=True)


async def demo(work: Path) -> int:
    sts = MotoSts()
    sts.start()
    try:
        async with KubeApiServer() as kube:
            kube.add_namespace("shop", annotations={"iam.amazonaws.com/permitted": "app-.*"})
            for name, ip, role in PODS:
                kube.add_pod(
                    "shop", name, ip=ip, host_ip=NODE,
                    annotations={"iam.amazonaws.com/role": role},
                )  # fmt: skip
            say(f"Kubernetes API test server: {kube.url}; STS (moto): {sts.endpoint_url}")
            say("namespace shop permits 'app-.*'; pods: web → app-web, intruder → admin")
            tls = make_tls_dirs(work / "tls")
            async with running_server(kube, sts, tls, work) as podiam:
                say(f"podiam-server: mutual-TLS gRPC on {podiam.target}\n")
                async with podiam.channel() as channel:
                    return await ask(podiam.stub(channel), sts)
    finally:
        sts.stop()


async def ask(stub, sts: MotoSts) -> int:
    outcome = 0
    for name, ip, role in PODS:
        request = kiam_pb2.GetPodCredentialsRequest(ip=ip, role=role)
        try:
            creds = await stub.GetPodCredentials(request)
        except grpc.aio.AioRpcError as error:
            say(f"pod {name} ({ip}) asks for {role}: refused, {error.code().name}: "
                f"{error.details()}")  # fmt: skip
            outcome |= 0 if name == "intruder" else 1
            continue
        who = await asyncio.to_thread(caller_arn, sts.endpoint_url, as_aws(creds))
        say(f"pod {name} ({ip}) asks for {role}: {creds.code}, key {creds.access_key_id[:8]}…, "
            f"expires {creds.expiration}\n    STS says these credentials are {who}")  # fmt: skip
        outcome |= 0 if name == "web" else 1
    say("\ndemo finished: " + ("as expected" if outcome == 0 else "UNEXPECTED RESULT"))
    return outcome


def main() -> int:
    logs.configure("WARNING", json_log=False)
    logging.getLogger("server").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="podiam-demo-") as work:
        return asyncio.run(demo(Path(work)))


if __name__ == "__main__":
    sys.exit(main())
