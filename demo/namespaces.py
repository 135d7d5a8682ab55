"""The demo's network-namespace variant: podiam intercepting a real SDK's metadata calls.

Builds the one-machine cluster of ``tests.support.e2e`` with one worker, shows the DNAT rule the
agent installed, and runs boto3's default credential chain inside two pods: one whose namespace
permits its role, one whose namespace does not.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.support.e2e import WHO_AM_I, PodiamCluster

PERMITTED = {"shop": "app-.*"}
CREDS = "/latest/meta-data/iam/security-credentials/"


def say(text: str = "") -> None:
    print(text, flush=True)


async def namespace_demo(work: Path) -> bool:
    say("building network namespaces: a server node, a worker node, pods behind the worker …")
    async with PodiamCluster(workers=1, permitted=PERMITTED) as podiam:
        worker = podiam.worker(0)
        say(f"Kubernetes API test server and moto (STS, metadata) at {podiam.cluster.root_ip}")
        say(f"podiam-server on {podiam.server_address}; podiam-agent on {worker.ip}:8181")
        for rule in podiam.agent(worker).dnat_rules():
            say(f"DNAT rule on the worker node: iptables -t nat {rule}")
        say("namespace shop permits 'app-.*'\n")
        ok = True
        for name, role, expected in (("web", "app-web", True), ("intruder", "admin", False)):
            pod = podiam.add_pod(worker, "shop", name, role)
            result = await pod.run(sys.executable, "-c", WHO_AM_I, podiam.sts_url)
            found = json.loads(result.stdout) if result.returncode == 0 else {}
            say(f"pod {name} ({pod.ip}), annotated {role}, runs boto3's default credential chain:")
            if found.get("arn"):
                say(f"    credentials from {found['method']}: {found['access_key'][:8]}…")
                say(f"    STS GetCallerIdentity says {found['arn']}")
                ok &= expected and f"assumed-role/{role}/" in found["arn"]
            else:
                say(f"    no credentials ({found.get('error') or result.stderr.strip()})")
                # What the SDK does not show: the agent's refusal, with its reason.
                answer = await pod.fetch(CREDS)
                say(f"    the agent answered {CREDS} with HTTP {answer.status}: {answer.body}")
                ok &= not expected and answer.status == 403
        return ok
