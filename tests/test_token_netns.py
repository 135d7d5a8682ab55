"""The token endpoint behind its real DNAT rule: a pod in its own network namespace asks
169.254.170.23:80, the node's rule sends it to the agent, and ``podiam-agent cleanup`` takes
the rule away with the metadata one. (Tokens and TokenReview: tests/test_token_credentials.py,
against the real control plane; this cluster's Kubernetes API is the test double.)"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest_asyncio

from tests.support.e2e import PodiamCluster
from tests.support.netns import requires_root

pytestmark = requires_root

TOKEN_URL = "http://169.254.170.23/v1/credentials"


@pytest_asyncio.fixture(scope="module")
async def podiam() -> AsyncIterator[PodiamCluster]:
    async with PodiamCluster(
        workers=1, permitted={"apps": "app-.*"}, worker_args={0: ["--token-endpoint"]}
    ) as podiam:
        yield podiam


def token_rules(podiam: PodiamCluster) -> list[str]:
    out = podiam.worker(0).run("iptables", "-w", "5", "-t", "nat", "-S", "PREROUTING").stdout
    return [line for line in out.splitlines() if "169.254.170.23" in line]


async def test_a_pod_reaches_the_token_endpoint_through_its_dnat_rule(podiam: PodiamCluster):
    (rule,) = token_rules(podiam)
    assert "--dport 80" in rule and "--to-destination" in rule and ":8182" in rule
    pod = podiam.add_pod(0, "apps", "tokened", "app-tokened")
    missing = await pod.netns.fetch(TOKEN_URL)
    assert missing.status == 401, missing
    assert json.loads(missing.body)["code"] == "token-required"
    # A token reaches the server, which here serves no token-bound credentials: refused, and
    # never anything else (the node's metadata service is not even asked).
    asked = await pod.netns.fetch(TOKEN_URL, headers={"Authorization": "some-token"})
    assert (asked.status, json.loads(asked.body)["code"]) == (501, "token-credentials-off")


async def test_cleanup_removes_the_token_rule_too(podiam: PodiamCluster):
    agent = podiam.agent(0)
    assert await agent.stop() == 0, agent.log()
    assert len(token_rules(podiam)) == 1, "the rule outlives the agent, as the metadata one"
    cleaned = agent.cleanup()
    assert cleaned.returncode == 0, cleaned.stderr
    assert token_rules(podiam) == [] and agent.dnat_rules() == []
    assert cleaned.stdout.count("removed: iptables -t nat -D PREROUTING") == 2, cleaned.stdout
