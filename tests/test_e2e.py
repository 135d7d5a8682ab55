"""podiam end to end: the real server and agents as processes on a one-machine cluster of network
namespaces, and real AWS clients (boto3, the AWS CLI) inside pods asking 169.254.169.254 — what a
user of EKS sees. See ``tests/support/e2e.py`` for how the cluster is built.

Every client runs in a pod's namespace with only ``PodiamCluster.pod_env()`` as environment: no
credentials, no config files, nothing disabling the metadata service. If a request ever leaked
through to the node's metadata service (moto here), it would answer with moto's own instance
credentials, ``default-role`` / access key ``test-key``; the tests check that never happens.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.support.e2e import (
    NODE_GROUP_TAINT,
    REPO,
    WHO_AM_I,
    NodeMetadataService,
    PodiamCluster,
    PodiamPod,
    dnat_rules,
)
from tests.support.netns import Fetched, list_namespaces, requires_root, root_links
from tests.support.waiting import eventually

pytestmark = requires_root

CREDS = "/latest/meta-data/iam/security-credentials/"
TOKEN_TTL = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN = "X-aws-ec2-metadata-token"
NODE_ACCESS_KEY = "test-key"  # what moto's metadata service hands out as the node's credentials
NODE_ROLE = "default-role"
AWS_CLI = str(Path(sys.executable).with_name("aws"))
PERMITTED = {"apps": "app-.*", "other": "other-.*"}

# Inside a pod: GetCallerIdentity with the credentials given as arguments.
CALLER_OF = r"""
import sys
import boto3
url, key, secret, token = sys.argv[1:5]
sts = boto3.client("sts", endpoint_url=url, aws_access_key_id=key,
                   aws_secret_access_key=secret, aws_session_token=token)
print(sts.get_caller_identity()["Arn"])
"""

# Inside a node, as an agent would: GetPodCredentials over mutual TLS with the agent certificate.
# Prints "OK <access key>" or the status code's name and the server's message.
ASK_SERVER = r"""
import sys
from pathlib import Path
import grpc
from certs.tls import TlsFiles, channel_credentials
from protos import kiam_pb2, kiam_pb2_grpc
target, ip, role, tls = sys.argv[1:5]
credentials = channel_credentials(TlsFiles.agent_in(Path(tls)))
with grpc.secure_channel(target, credentials) as channel:
    stub = kiam_pb2_grpc.KiamServiceStub(channel)
    request = kiam_pb2.GetPodCredentialsRequest(ip=ip, role=role)
    try:
        answer = stub.GetPodCredentials(request, timeout=10)
        print("OK", answer.access_key_id)
    except grpc.RpcError as error:
        print(error.code().name, error.details())
"""


@pytest_asyncio.fixture(scope="module")
async def podiam() -> AsyncIterator[PodiamCluster]:
    async with PodiamCluster(workers=2, permitted=PERMITTED) as podiam:
        yield podiam
    assert leftovers(podiam) == [], "the cluster left namespaces or links behind"


def leftovers(podiam: PodiamCluster) -> list[str]:
    cluster = podiam.cluster
    names = [n for n in list_namespaces() if n.startswith(cluster.run_id)]
    return names + [link for link in root_links() if link == cluster.root_interface]


def assumed_role(role: str) -> str:
    return f"arn:aws:sts::123456789012:assumed-role/{role}/"


async def who_am_i(podiam: PodiamCluster, pod: PodiamPod, **env: str) -> dict:
    result = await pod.run(sys.executable, "-c", WHO_AM_I, podiam.sts_url, env=env)
    assert result.returncode == 0, result.stderr + podiam.logs()
    return json.loads(result.stdout)


def assert_no_credentials(found: dict, podiam: PodiamCluster) -> None:
    assert found["access_key"] != NODE_ACCESS_KEY, "the node's credentials reached a pod"
    assert (found["method"], found["access_key"]) == (None, None), found
    assert (found["arn"], found["error"]) == (None, "NoCredentialsError"), podiam.logs()


# ---------------------------------------------------------------- real clients get the pod's role


@pytest.mark.parametrize(
    "env",
    [
        pytest.param({}, id="botocore-default-token-then-v1-fallback"),
        pytest.param({"AWS_EC2_METADATA_V1_DISABLED": "true"}, id="imdsv2-only"),
    ],
)
async def test_boto3_in_a_pod_gets_credentials_for_the_pods_own_role(
    podiam: PodiamCluster, env: dict[str, str], request: pytest.FixtureRequest
) -> None:
    name = f"boto-{request.node.callspec.id[:8]}"
    pod = podiam.add_pod(0, "apps", name, "app-web")
    found = await who_am_i(podiam, pod, **env)
    assert found["method"] == "iam-role", found  # the instance metadata provider answered
    assert found["arn"].startswith(assumed_role("app-web")), found
    assert found["access_key"] != NODE_ACCESS_KEY


async def test_imdsv1_requests_without_a_token_get_the_pods_role(podiam: PodiamCluster) -> None:
    # botocore always tries a token first, so the plain IMDSv1 exchange (no token at all), as
    # older SDKs and curl scripts make it, is checked by hand; STS vouches for the result.
    pod = podiam.add_pod(1, "apps", "imdsv1", "app-v1")
    role = await pod.fetch(CREDS)
    assert (role.status, role.body) == (200, "app-v1"), podiam.logs()
    answer = await pod.fetch(CREDS + "app-v1")
    assert answer.status == 200, answer
    creds = json.loads(answer.body)
    assert (creds["Code"], creds["Type"]) == ("Success", "AWS-HMAC")
    arn = await pod.run(
        sys.executable, "-c", CALLER_OF, podiam.sts_url,
        creds["AccessKeyId"], creds["SecretAccessKey"], creds["Token"],
    )  # fmt: skip
    assert arn.stdout.startswith(assumed_role("app-v1")), arn.stderr


async def test_aws_cli_in_a_pod_is_the_pods_own_role(podiam: PodiamCluster) -> None:
    pod = podiam.add_pod(1, "apps", "cli", "app-cli")
    result = await pod.run(
        AWS_CLI, "sts", "get-caller-identity", "--endpoint-url", podiam.sts_url,
        "--output", "json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + podiam.logs()
    assert json.loads(result.stdout)["Arn"].startswith(assumed_role("app-cli"))


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("name", "role"),
    [("forbidden", "admin"), ("no-role", None)],
    ids=["role-not-permitted-by-namespace", "no-role-annotation"],
)
async def test_pod_without_a_permitted_role_finds_no_credentials_at_all(
    podiam: PodiamCluster, name: str, role: str | None
) -> None:
    pod = podiam.add_pod(0, "apps", name, role)
    assert_no_credentials(await who_am_i(podiam, pod), podiam)
    # Asking for the node's role by name gets nothing either: 404 for a pod without a role (as
    # an instance without a profile), 403 with the reason for one whose role is not permitted.
    node_role = await pod.fetch(CREDS + NODE_ROLE)
    assert node_role.status == (404 if role is None else 403), node_role
    assert NODE_ACCESS_KEY not in node_role.body


async def test_user_data_and_the_nodes_credentials_are_never_proxied(
    podiam: PodiamCluster,
) -> None:
    pod = podiam.add_pod(1, "apps", "curious")
    for path in ("/latest/user-data", CREDS + NODE_ROLE, "/latest/meta-data/iam/info"):
        answer = await pod.fetch(path)
        assert answer.status == 404, (path, answer)
        assert NODE_ACCESS_KEY not in answer.body and NODE_ROLE not in answer.body, answer
    # The agent saw the pod's own address (DNAT keeps it; only traffic to the LAN is
    # masqueraded), which is how it tells pods apart.
    assert await podiam.agent(1).logged(f"GET /latest/user-data from {pod.ip} refused")


async def test_allow_listed_metadata_paths_are_answered_by_the_real_metadata_service(
    podiam: PodiamCluster,
) -> None:
    pod = podiam.add_pod(1, "apps", "regional")
    answer = await pod.fetch("/latest/meta-data/placement/region")
    assert (answer.status, answer.body) == (200, "us-east-1"), answer


async def test_imdsv2_token_minted_for_one_pod_is_rejected_for_another(
    podiam: PodiamCluster,
) -> None:
    owner = podiam.add_pod(0, "apps", "token-owner", "app-owner")
    thief = podiam.add_pod(0, "apps", "token-thief", "app-thief")
    minted = await owner.fetch("/latest/api/token", method="PUT", headers={TOKEN_TTL: "60"})
    assert minted.status == 200, minted
    token = {TOKEN: minted.body}
    assert (await owner.fetch(CREDS, headers=token)).body == "app-owner"
    stolen = await thief.fetch(CREDS, headers=token)
    assert stolen.status == 401, stolen
    assert "app-owner" not in stolen.body


async def test_imdsv2_token_survives_an_agent_restart(podiam: PodiamCluster) -> None:
    # SDKs keep a token for its whole TTL (the Rust SDK retries a 401 with the same token), so
    # a DaemonSet rollout must not invalidate the tokens pods hold.
    pod = podiam.add_pod(1, "apps", "token-keeper", "app-keeper")
    minted = await pod.fetch("/latest/api/token", method="PUT", headers={TOKEN_TTL: "21600"})
    assert minted.status == 200, minted
    agent = podiam.agent(1)
    assert await agent.stop() == 0, agent.log()
    await agent.start()
    answer = await pod.fetch(CREDS, headers={TOKEN: minted.body})
    assert (answer.status, answer.body) == (200, "app-keeper"), agent.log()


# ---------------------------------------------------------------- node binding


async def test_agent_certificate_on_one_node_gets_nothing_for_pods_on_another(
    podiam: PodiamCluster,
) -> None:
    pod = podiam.add_pod(1, "apps", "bound", "app-bound")
    argv = [sys.executable, "-c", ASK_SERVER, podiam.server_address, pod.ip, "app-bound",
            str(podiam.tls)]  # fmt: skip
    env = {"PYTHONPATH": str(REPO)}
    elsewhere = await podiam.worker(0).arun(*argv, env=env, timeout=30)
    assert elsewhere.stdout.startswith("PERMISSION_DENIED"), elsewhere.stdout + elsewhere.stderr
    at_home = await pod.node.arun(*argv, env=env, timeout=30)
    assert at_home.stdout.startswith("OK ASIA"), at_home.stdout + at_home.stderr


# ---------------------------------------------------------------- IP reuse


async def test_pod_reusing_a_deleted_pods_ip_never_gets_the_old_pods_role(
    podiam: PodiamCluster,
) -> None:
    old = podiam.add_pod(0, "apps", "old-tenant", "app-old")
    assert (await who_am_i(podiam, old))["arn"].startswith(assumed_role("app-old"))

    podiam.delete_pod(old)
    new = podiam.add_pod(0, "other", "new-tenant", "other-new", reuse=old)
    assert new.ip == old.ip
    # Asked at once, before anything could settle: the old role must already be gone.
    role = await new.fetch(CREDS)
    assert (role.status, role.body) == (200, "other-new"), podiam.logs()
    found = await who_am_i(podiam, new)
    assert found["arn"].startswith(assumed_role("other-new")), found
    stale = await new.fetch(CREDS + "app-old")
    assert stale.status == 404, stale


# ---------------------------------------------------------------- the DNAT rule over restarts


async def test_new_nodes_lose_only_their_startup_taint_once_their_agent_intercepts(
    podiam: PodiamCluster,
) -> None:
    assert podiam.kube is not None
    kube = podiam.kube
    for node in podiam.workers:
        name = node.node_name
        await eventually(lambda n=name: kube.taints(n) == [NODE_GROUP_TAINT], timeout=15)
        assert dnat_rules(node), f"{node.node_name} lost its taint without a DNAT rule"
        assert await podiam.agent(node).logged("reported node " + node.node_name + " ready")
    reasons = {
        (e["involvedObject"]["kind"], e["involvedObject"]["name"], e["reason"]) for e in kube.events
    }
    assert {("Node", n.node_name, "PodiamAgentReady") for n in podiam.workers} <= reasons


@pytest_asyncio.fixture
async def node_metadata(
    podiam: PodiamCluster, tmp_path: Path
) -> AsyncIterator[NodeMetadataService]:
    """The node's own metadata service on worker 1 (what pods must never reach while podiam
    is installed), with its request log."""
    service = NodeMetadataService(podiam.worker(1), tmp_path / "node-metadata.log")
    await service.start()
    yield service
    await service.stop()


def refused(answer: Fetched) -> bool:
    return answer.status is None and "refused" in (answer.error or "").lower()


async def test_rule_outlives_every_stop_so_pods_are_refused_never_sent_to_the_node(
    podiam: PodiamCluster, node_metadata: NodeMetadataService
) -> None:
    agent = podiam.agent(1)
    pod = podiam.add_pod(1, "apps", "restarts", "app-restarts")
    assert len(agent.dnat_rules()) == 1

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
        code = await agent.stop(sig)
        assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 0), agent.log()
        assert len(agent.dnat_rules()) == 1, f"the rule went with {sig.name}"
        # No agent listens where the rule points: refused at once, never the node's service.
        stranded = await pod.fetch(CREDS, timeout=1)
        assert refused(stranded), stranded
        await agent.start()
        assert len(agent.dnat_rules()) == 1, "a restart must not stack copies"
        answer = await pod.fetch(CREDS)
        assert (answer.status, answer.body) == (200, "app-restarts"), agent.log()
    assert node_metadata.requests() == [], "a pod reached the node's metadata service"


async def test_cleanup_hands_pods_back_to_the_nodes_metadata_service(
    podiam: PodiamCluster, node_metadata: NodeMetadataService
) -> None:
    agent = podiam.agent(1)
    pod = podiam.add_pod(1, "apps", "uninstalled", "app-uninstalled")
    assert await agent.stop() == 0, agent.log()

    cleaned = agent.cleanup()
    assert cleaned.returncode == 0, cleaned.stderr
    assert "removed: iptables -t nat -D PREROUTING" in cleaned.stdout, cleaned.stdout
    assert agent.dnat_rules() == []
    # Uninstalled: the pod reaches the node's own metadata service again.
    direct = await pod.fetch("/latest/meta-data/instance-id")
    assert (direct.status, direct.body) == (200, "node-metadata /latest/meta-data/instance-id")
    assert node_metadata.requests() == [f"{pod.ip} /latest/meta-data/instance-id"]

    again = agent.cleanup()
    assert (again.returncode, again.stderr) == (0, "")
    assert "nothing to do" in again.stdout

    await agent.start()
    assert len(agent.dnat_rules()) == 1
    answer = await pod.fetch(CREDS)
    assert (answer.status, answer.body) == (200, "app-uninstalled"), agent.log()
    assert len(node_metadata.requests()) == 1


# Inside a pod: one keep-alive connection to 169.254.169.254. Asks once, prints the answer, waits
# for the file named by argv[2], asks again on the same connection, prints what happened.
KEEP_ALIVE = r"""
import http.client, json, os, sys, time
path, go = sys.argv[1], sys.argv[2]
conn = http.client.HTTPConnection("169.254.169.254", 80, timeout=3)
def ask(query):
    try:
        conn.request("GET", path + query)
        response = conn.getresponse()
        return [response.status, response.read().decode()]
    except Exception as error:
        return [None, type(error).__name__]
print(json.dumps(ask("?first")), flush=True)
while not os.path.exists(go):
    time.sleep(0.05)
print(json.dumps(ask("?second")), flush=True)
"""


async def test_connection_opened_before_the_agent_never_reaches_the_node_again(
    podiam: PodiamCluster, node_metadata: NodeMetadataService, tmp_path: Path
) -> None:
    agent = podiam.agent(1)
    pod = podiam.add_pod(1, "apps", "early-bird", "app-early")
    assert await agent.stop() == 0, agent.log()
    assert agent.cleanup().returncode == 0
    go = tmp_path / "go"
    client = await pod.netns.spawn(
        sys.executable, "-c", KEEP_ALIVE, "/latest/meta-data/instance-id", str(go),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert client.stdout is not None
    first = json.loads(await asyncio.wait_for(client.stdout.readline(), 10))
    assert first == [200, "node-metadata /latest/meta-data/instance-id?first"]

    await agent.start()  # installs the rule, then cuts connections opened before it
    go.touch()
    second = json.loads(await asyncio.wait_for(client.stdout.readline(), 10))
    # Its conntrack entry deleted, the connection's next packet is NATed afresh — to the agent,
    # whose kernel knows no such connection and resets it. The SDK reconnects, to the agent.
    assert second[0] is None, second
    assert node_metadata.requests() == [f"{pod.ip} /latest/meta-data/instance-id?first"]
    answer = await pod.fetch(CREDS)
    assert (answer.status, answer.body) == (200, "app-early"), agent.log()
    assert "conntrack: cut 1 connection" in agent.log()


# Inside a pod: threads asking for the pod's credentials without pause until the file argv[2]
# exists; prints one JSON summary. argv[4] threads keep their connection alive (an SDK in a
# long-running process), argv[5] open a new connection per request (a process per call, like the
# AWS CLI) — those are the ones a closing listener could drop from its queue. Like botocore
# (urllib3), a connection error on a *reused* keep-alive connection is retried once on a new
# connection — the server may close an idle connection just as the client sends on it, which
# no server can avoid — while any other error, or a second one, is a failed request.
LOAD = r"""
import http.client, json, os, sys, threading, time
path, stop, after = sys.argv[1:4]
keepalive, fresh = int(sys.argv[4]), int(sys.argv[5])
# A very busy pod, but inside the agent's default fair share (2,000 requests/s per pod): the
# test is about the hand-over, and the share's 429s are tests/test_agent_hostile.py's business.
interval = (keepalive + fresh) / 1500
lock = threading.Lock()
totals = {"ok": 0, "ok_after": 0, "retried": 0, "failed": []}
def worker(keep):
    conn, reused = None, False
    due = time.monotonic()
    while not os.path.exists(stop):
        due += interval
        time.sleep(max(0.0, due - time.monotonic()))
        late = os.path.exists(after)
        for attempt in (1, 2):
            if conn is None:
                conn, reused = http.client.HTTPConnection("169.254.169.254", 80, timeout=2), False
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                raw = response.read()
            except (OSError, http.client.HTTPException) as error:
                conn.close()
                conn, was_reused = None, reused
                if was_reused and attempt == 1:
                    with lock:
                        totals["retried"] += 1
                    continue
                with lock:
                    totals["failed"].append(f"{type(error).__name__}: {error}")
                break
            if response.will_close or not keep:
                conn.close()
                conn = None
            else:
                reused = True
            # An answer is an answer: a 503 or a wrong body is a failed request, never retried.
            try:
                good = response.status == 200 and json.loads(raw)["Code"] == "Success"
            except (ValueError, KeyError):
                good = False
            with lock:
                if good:
                    totals["ok"] += 1
                    totals["ok_after"] += late
                else:
                    totals["failed"].append(f"{response.status} {raw[:100]!r}")
            break
kinds = [True] * keepalive + [False] * fresh
threads = [threading.Thread(target=worker, args=(keep,)) for keep in kinds]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
totals["failed"] = totals["failed"][:20]
print(json.dumps(totals))
"""


async def test_upgrade_beside_the_old_agent_fails_no_request_and_keeps_one_rule(
    podiam: PodiamCluster, tmp_path: Path
) -> None:
    node, old = podiam.worker(1), podiam.agent(1)
    pod = podiam.add_pod(1, "apps", "busy", "app-busy")
    assert (await pod.fetch(CREDS)).body == "app-busy"  # its credentials are in the stream
    stop, after = tmp_path / "stop", tmp_path / "after"
    load = await pod.netns.spawn(
        sys.executable, "-c", LOAD, CREDS + "app-busy", str(stop), str(after), "3", "3",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    await asyncio.sleep(1)

    # As the DaemonSet surges: the new agent starts on the same port and becomes ready...
    new = await podiam.start_agent_beside(node, "agent-new")
    assert len(dnat_rules(node)) == 1
    await asyncio.sleep(1)
    # ...and only then is the old one sent SIGTERM.
    assert await old.stop() == 0, old.log()
    after.touch()
    await asyncio.sleep(2)
    stop.touch()
    assert load.stdout is not None
    totals = json.loads(await asyncio.wait_for(load.stdout.read(), 30))

    assert totals["failed"] == [], f"{totals}\n{old.log()}\n{new.log()}"
    assert totals["ok_after"] > 0, "the new agent answered nothing"
    assert len(dnat_rules(node)) == 1
    # The new agent cut no connection: the old agent's are DNATed, not the node's service's.
    assert "conntrack: cut" not in new.log()
    # It listened only with its snapshot, and took every new connection from then on.
    assert "snapshot applied; serving the metadata API" in new.log()
    assert "new connections come here only" in new.log()
    # The new agent is this node's agent from now on.
    podiam.extra_agents.remove(new)
    podiam.agents[node.node_name] = new


# ---------------------------------------------------------------- nothing left behind


def root_state(podiam: PodiamCluster) -> list[str]:
    """Root-namespace routes and rules that mention the cluster's LAN or pod addresses."""
    lan = f"10.200.{podiam.cluster.lan}."
    outputs = [
        subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        for argv in (["ip", "route", "show", "table", "all"], ["iptables-save"])
    ]
    return [
        line
        for out in outputs
        for line in out.splitlines()
        if (lan in line or "10.201." in line) and not line.startswith("#")
    ]


async def test_teardown_leaves_no_namespaces_links_rules_or_processes() -> None:
    podiam = PodiamCluster(workers=1, permitted={"apps": ".*"})
    async with podiam:
        pod = podiam.add_pod(0, "apps", "short-lived", "app-brief")
        assert (await pod.fetch(CREDS)).body == "app-brief"
        node, server = podiam.worker(0), podiam.server
        assert len(dnat_rules(node)) == 1
        # Only the root-namespace link: no routes to pods, no rules outside the nodes.
        assert root_state(podiam) == [
            line for line in root_state(podiam) if podiam.cluster.root_interface in line
        ]
        await podiam.stop_agents()
        assert len(dnat_rules(node)) == 1, "a stopped agent must leave its DNAT rule"
        assert all(agent.returncode == 0 for agent in podiam.agents.values()), podiam.logs()
    assert leftovers(podiam) == []
    assert root_state(podiam) == []
    assert server is not None and server.returncode == 0, server.log()
    assert all(p.returncode is not None for p in podiam.processes), "a process survived"
    assert not podiam.work.exists()
