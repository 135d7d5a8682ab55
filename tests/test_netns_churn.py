"""IP reuse on a node with per-pod host routes: pods handed a deleted pod's IP never hear its role.

A smaller run of the fault suite's ``churn-routes`` fault (bench/fault_churn_routes.py), in
network namespaces with the agent's own iptables DNAT rule and its netlink route evidence: each
of a few IPs goes from pod to pod, across namespaces and roles, in the order a kubelet works
(the old pod's sandbox and veth go, then its object; a new pod gets the IP behind a new veth and
asks at once, before the API has it). The Kubernetes API is the test double here. The checks are
counts of wrong answers, never timings.
"""

from __future__ import annotations

from bench.fault_churn_routes import measure
from tests.support.netns import requires_tools

pytestmark = requires_tools("ip", "iptables", "conntrack")

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
