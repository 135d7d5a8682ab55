"""The local demo (`make demo`, `python -m demo`): podiam on one machine with everything embedded.

moto plays STS and the EC2 metadata service, the Kubernetes API test server holds a namespace
that permits `app-.*` and two annotated pods, and a real podiam server and agent run with freshly
generated certificates. One pod gets credentials for its role — and STS confirms whose they
are — the other is refused; then everything shuts down.

As root (with `ip` and `iptables`), the demo builds network namespaces: a server node, a worker
node whose agent installs the real DNAT rule, and pods behind it that call 169.254.169.254 with
boto3 exactly as they would on EKS. Otherwise it runs a loopback variant: the pods are HTTP
clients on their own 127.0.1.x addresses talking to the agent directly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from demo.variant import why_not_namespaces
from runtime import logs
from server.identity import AwsCredentials
from tests.support.agent import NODE, pod_session, running_agent
from tests.support.kubeapi import KubeApiServer
from tests.support.moto_sts import MotoSts, caller_arn
from tests.support.server import running_server
from tests.support.tls import make_tls_dirs

PERMITTED = {"shop": "app-.*"}
PODS = [("web", "app-web"), ("intruder", "admin")]  # (pod, role): web permitted, intruder not
CREDS = "/latest/meta-data/iam/security-credentials/"


def say(text: str = "") -> None:
    print(text, flush=True)


async def loopback_demo(work: Path) -> bool:
    sts = MotoSts()
    sts.start()
    try:
        async with KubeApiServer() as kube:
            for namespace, regex in PERMITTED.items():
                kube.add_namespace(namespace, annotations={"iam.amazonaws.com/permitted": regex})
            ips = {}
            for n, (name, role) in enumerate(PODS, start=1):
                ips[name] = f"127.0.1.{n}"
                kube.add_pod(
                    "shop", name, ip=ips[name], host_ip=NODE,
                    annotations={"iam.amazonaws.com/role": role},
                )  # fmt: skip
            say(f"Kubernetes API test server {kube.url}; moto (STS, metadata) {sts.endpoint_url}")
            say("namespace shop permits 'app-.*'; pod web → app-web, pod intruder → admin")
            tls = make_tls_dirs(work / "tls")
            async with running_server(kube, sts, tls, work) as podiam:
                say(f"podiam-server on {podiam.target}")
                async with running_agent(
                    server_port=podiam.server.port, tls=tls, metadata=sts.endpoint_url
                ) as agent:
                    await asyncio.wait_for(agent.follower.synced_once.wait(), 30)
                    say(f"podiam-agent on {NODE}:{agent.port}, connected to the server\n")
                    ok = True
                    for name, role in PODS:
                        ok &= await ask(agent.port, ips[name], name, role, sts)
                    return ok
    finally:
        sts.stop()


async def ask(port: int, ip: str, name: str, role: str, sts: MotoSts) -> bool:
    """What a pod's SDK does: list its role, fetch the credentials; then ask STS who they are."""
    base = f"http://{NODE}:{port}{CREDS}"
    async with pod_session(ip) as http:
        async with http.get(base) as response:
            listed = await response.text()
            if response.status != 200:
                say(f"pod {name} ({ip}): refused, HTTP {response.status}: {listed.strip()}")
                return name == "intruder"
        async with http.get(base + listed) as response:
            document = json.loads(await response.text())
    creds = AwsCredentials(
        document["AccessKeyId"], document["SecretAccessKey"], document["Token"],
        datetime.now(UTC), datetime.now(UTC),
    )  # fmt: skip
    who = await asyncio.to_thread(caller_arn, sts.endpoint_url, creds)
    say(f"pod {name} ({ip}): role {listed}, key {document['AccessKeyId'][:8]}…, "
        f"expires {document['Expiration']}\n    STS says these credentials are {who}")  # fmt: skip
    return name == "web" and f"assumed-role/{role}/" in who


def main() -> int:
    logs.configure("WARNING", json_log=False)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    why_not = why_not_namespaces()
    if why_not is None:
        # Imported here: it needs the network-namespace kit, which needs root.
        from demo.namespaces import namespace_demo

        variant, demo = "network namespaces and iptables", namespace_demo
    else:
        reason, then = why_not
        say(f"{reason}: running the loopback variant, where pods are 127.0.1.x clients of the")
        say(f"agent and no DNAT rule is involved. {then} it shows the interception too.\n")
        variant, demo = "loopback", loopback_demo
    with tempfile.TemporaryDirectory(prefix="podiam-demo-") as work:
        ok = asyncio.run(demo(Path(work)))
    say(f"\ndemo ({variant}) finished: " + ("as expected" if ok else "UNEXPECTED RESULT"))
    say(f"Next: `make up` keeps such a stack running to poke at; the programs are in "
        f"{Path(sys.executable).parent} (`. .venv/bin/activate` puts them on PATH).")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
