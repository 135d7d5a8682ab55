"""IP reuse on a node with per-pod host routes: pods handed a deleted pod's IP never hear its role.

A smaller run of the fault suite's ``churn-routes`` fault (bench/fault_churn_routes.py), in
network namespaces with the agent's own iptables DNAT rule and its netlink route evidence: each
of a few IPs goes from pod to pod, across namespaces and roles, in the order a kubelet works
(the old pod's sandbox and veth go, then its object; a new pod gets the IP behind a new veth and
asks at once, before the API has it). The Kubernetes API is the test double here. The checks are
counts of wrong answers, never timings.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.fault_churn_routes import measure
from tests.support.netns import Cluster, requires_tools

pytestmark = requires_tools("ip", "iptables", "conntrack")

REPO = Path(__file__).resolve().parents[1]
REPLACEMENTS = 200
IPS = 4


async def test_pods_reusing_ips_behind_new_veths_never_get_the_previous_pods_role() -> None:
    got = await measure(replacements=REPLACEMENTS, ips=IPS, timeout=100)
    print("churn with host routes:", got)
    assert got["replacements"] == REPLACEMENTS and got["ips"] == IPS, got
    # Every pod asked while it held its IP, the new ones from the moment their veth was up.
    assert got["answers"] >= REPLACEMENTS, got
    assert got["old_role_to_new_pod"] == 0, got
    assert got["old_role_after_server"] == 0, got
    # Once the server had the new pod, its every answer was its own role.
    assert got["new_pod_failures"] == 0, got


# Runs inside a node namespace: the agent's route follower on uvloop, a pod veth made, its IP
# handed to a new veth, and what the follower reports, read without a turn of the event loop
# after each kernel call (settle() is what the listener calls on accepting a connection).
_SETTLE = r"""
import asyncio, json, subprocess, sys
import uvloop
from agent.hostroutes import HostRoutes

def ip(*argv):
    subprocess.run(["ip", *argv], check=True, capture_output=True)

def veth(name, peer, address):
    ip("link", "add", name, "type", "veth", "peer", "name", peer)
    ip("link", "set", name, "up")
    ip("link", "set", peer, "up")
    ip("route", "add", f"{address}/32", "dev", name)

async def main():
    changes = []
    routes = HostRoutes("eni+", on_change=changes.append)
    task = asyncio.create_task(routes.run())
    veth("eniold", "oldpeer", "10.9.0.7")
    while not (routes.watching and routes.interface("10.9.0.7")):
        await asyncio.sleep(0.01)
    old = routes.interface("10.9.0.7")
    ip("link", "del", "eniold")
    veth("eninew", "newpeer", "10.9.0.7")
    before = routes.interface("10.9.0.7")
    routes.settle()
    after = routes.interface("10.9.0.7")
    task.cancel()
    print(json.dumps({"old": old, "before": before, "after": after, "changes": changes}))

uvloop.run(main())
"""


def test_a_new_veth_for_a_reused_ip_is_known_as_soon_as_the_kernel_has_it() -> None:
    with Cluster() as cluster:
        node = cluster.node("settle")
        done = node.run(sys.executable, "-c", _SETTLE, env={"PYTHONPATH": str(REPO)})
    got = json.loads(done.stdout)
    # Before settling, the follower had not read the kernel's messages yet (nothing awaited);
    # after, it reports the new veth, so the old pod's entry is already dropped.
    assert got["before"] == got["old"], got
    assert got["after"] not in (None, got["old"]), got
    assert got["changes"] == ["10.9.0.7"] * 3, got  # appeared, went, appeared elsewhere
