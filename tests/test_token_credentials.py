"""Token-bound credentials against the real control plane: tokens come from the real
TokenRequest API (as the kubelet gets them for a projected volume) and are checked by the real
TokenReview; the server uses the chart's own RBAC with tokenCredentials enabled; the agent
serves GET /v1/credentials, and real clients (botocore, the AWS CLI) find it through their
default credential chains.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
import yaml
from prometheus_client import REGISTRY

from tests.support import helm
from tests.support.agent import running_agent
from tests.support.clusters import (
    RBAC_KINDS,
    ChartAccess,
    RealCluster,
    podiam_server,
    real_cluster,
    unique,
)
from tests.support.controlplane import POD_IP_ANNOTATION, ControlPlane
from tests.support.moto_sts import REGION
from tests.support.tcpproxy import TcpProxy
from tests.support.waiting import eventually
from tests.test_sdk_matrix import CLIENTS, built

PERMITTED = "iam.amazonaws.com/permitted"
ROLE = "iam.amazonaws.com/role"
RELEASE = "podiam-token"

pytestmark = pytest.mark.timeout(300)


def token_chart_access(plane: ControlPlane) -> ChartAccess:
    """The chart's RBAC with tokenCredentials enabled, as its own release (so the session's
    default-values RBAC, which other modules check, stays as it is)."""
    rendered = helm.render({"tokenCredentials": {"enabled": True}}, name=RELEASE)
    rbac = [m for m in rendered if m["kind"] in RBAC_KINDS]
    applied = plane.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(rbac))
    assert applied.returncode == 0, applied.stderr
    server = helm.one(rendered, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
    made = plane.kubectl("create", "token", server, "-n", helm.NAMESPACE, "--duration", "6h")
    assert made.returncode == 0, made.stderr
    account = f"system:serviceaccount:{helm.NAMESPACE}:{server}"
    return ChartAccess(rbac, account, made.stdout.strip(), "", "")


@pytest_asyncio.fixture(scope="module")
async def real(control_plane: ControlPlane) -> AsyncIterator[RealCluster]:
    access = await asyncio.to_thread(token_chart_access, control_plane)
    async with real_cluster(control_plane, access) as cluster:
        yield cluster


@pytest_asyncio.fixture(scope="module")
async def podiam(real: RealCluster, moto_sts, tls_dirs, server_flags):
    async with podiam_server(
        real.kubeconfig, moto_sts, tls_dirs,
        extra=["--token-credentials", "--webhook-bind", "127.0.0.1:0", *server_flags],
    ) as server:  # fmt: skip
        yield server


def _agent_flags() -> list[str]:
    return ["--token-endpoint", "--token-port", "0"]


@pytest_asyncio.fixture(scope="module")
async def agent(podiam, tls_dirs):
    async with running_agent(
        server_port=podiam.server.port, tls=tls_dirs, metadata="http://127.0.0.1:9",
        extra=_agent_flags(),
    ) as agent:  # fmt: skip
        await eventually(lambda: agent.streams.synced_once.is_set(), 30)
        yield agent


@pytest_asyncio.fixture(scope="module")
async def far_agent(podiam, tls_dirs):
    """An agent on another node: its connections to the server come from 127.0.0.2, while
    every pod of the test cluster runs on the node 127.0.0.1."""
    async with TcpProxy("127.0.0.1", podiam.server.port, source="127.0.0.2") as proxy:
        async with running_agent(
            server_port=proxy.port, tls=tls_dirs, metadata="http://127.0.0.1:9",
            extra=[*_agent_flags(), "--host", "127.0.0.2"],
        ) as agent:  # fmt: skip
            await eventually(lambda: agent.streams.synced_once.is_set(), 30)
            yield agent


_pod_ips = iter(f"127.0.3.{n}" for n in range(1, 250))


async def namespace(real: RealCluster, podiam, permitted: str = ".*") -> str:
    name = unique("tok")
    await real.add_namespace(name, {PERMITTED: permitted})
    await eventually(lambda: name in podiam.server.registry.namespaces, real.patience)
    return name


async def start_pod(real: RealCluster, ns: str, role: str, *, ip: str | None = None) -> dict:
    name = unique("app")
    annotations = {ROLE: role, POD_IP_ANNOTATION: ip or next(_pod_ips)}
    body = {
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            "nodeName": real.plane.node_names[0],
            "containers": [{"name": "app", "image": "podiam.test/app:none"}],
            "automountServiceAccountToken": False,
        },
    }  # fmt: skip
    path = f"/api/v1/namespaces/{ns}/pods"
    created = await real.admin.post(path, body)
    assert created.ok, created.body

    async def running() -> bool:
        status = (await real.admin.get(f"{path}/{name}")).body.get("status", {})
        return status.get("phase") == "Running"

    await eventually(running, timeout=real.patience)
    return created.body


async def pod_token(real: RealCluster, pod: dict, *, audience: str = "podiam") -> str:
    """A token bound to ``pod``, from the TokenRequest API, as the kubelet asks for one."""
    meta = pod["metadata"]
    path = f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/default/token"
    request = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "audiences": [audience],
            "expirationSeconds": 600,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                               "uid": meta["uid"]},
        },
    }  # fmt: skip
    answer = await real.admin.post(path, request)
    assert answer.ok, answer.body
    return answer.body["status"]["token"]


async def ask(agent, token: str) -> tuple[int, dict]:
    url = f"http://{agent.config.host}:{agent.token_port}/v1/credentials"
    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers={"Authorization": token}) as response:
            return response.status, json.loads(await response.text())


async def test_a_pods_token_gets_its_roles_credentials(real, podiam, agent):
    ns = await namespace(real, podiam)
    pod = await start_pod(real, ns, "token-reader")
    status, body = await ask(agent, await pod_token(real, pod))
    assert status == 200, body
    assert set(body) == {"AccessKeyId", "SecretAccessKey", "Token", "Expiration"}
    assert body["AccessKeyId"].startswith("ASIA")


async def test_a_known_token_is_answered_from_the_agents_memory(real, podiam, agent):
    ns = await namespace(real, podiam)
    pod = await start_pod(real, ns, "token-memory")
    token = await pod_token(real, pod)
    endpoint = agent.token_endpoint
    first = await ask(agent, token)
    assert first[0] == 200
    # The node stream brings the pod (with its uid) and its credentials; from then on the
    # agent answers the token without the server.
    await eventually(lambda: endpoint.known(token) is not None, real.patience)
    assert json.loads(endpoint.known(token)) == first[1]


def _token_calls() -> float:
    labels = {"rpc": "GetTokenCredentials", "outcome": "OK"}
    return REGISTRY.get_sample_value("podiam_agent_fallback_calls_total", labels) or 0.0


async def test_a_known_tokens_repeated_requests_never_reach_the_server(real, podiam, agent):
    ns = await namespace(real, podiam)
    token = await pod_token(real, await start_pod(real, ns, "token-repeat"))
    first = await ask(agent, token)
    assert first[0] == 200
    await eventually(lambda: agent.token_endpoint.known(token) is not None, real.patience)
    calls = _token_calls()
    url = f"http://{agent.config.host}:{agent.token_port}/v1/credentials"
    async with aiohttp.ClientSession() as session:  # one keep-alive connection
        for _ in range(20):
            async with session.get(url, headers={"Authorization": token}) as response:
                assert response.status == 200
                assert response.content_type == "application/json"
                assert json.loads(await response.text()) == first[1]
    assert _token_calls() == calls


async def test_a_pod_asking_before_its_node_has_reported_it_gets_credentials(real, podiam, agent):
    ns = await namespace(real, podiam)
    annotations = {
        ROLE: "token-early", POD_IP_ANNOTATION: next(_pod_ips), "podiam.test/start-delay": "700ms",
    }  # fmt: skip
    body = {
        "metadata": {"name": unique("early"), "annotations": annotations},
        "spec": {
            "nodeName": real.plane.node_names[0],
            "containers": [{"name": "app", "image": "podiam.test/app:none"}],
            "automountServiceAccountToken": False,
        },
    }
    path = f"/api/v1/namespaces/{ns}/pods"
    created = await real.admin.post(path, body)
    assert created.ok, created.body
    token = await pod_token(real, created.body)
    # The kubelet (kwok, delayed) has not reported the pod's node yet: the server can tell
    # neither its node nor, from the watch, much else about it.
    now = await real.admin.get(f"{path}/{body['metadata']['name']}")
    assert not now.body.get("status", {}).get("hostIP"), now.body["status"]
    status, answer = await ask(agent, token)
    assert status == 200, answer
    assert answer["AccessKeyId"].startswith("ASIA")


async def test_a_token_sent_through_another_nodes_agent_is_refused(real, podiam, agent, far_agent):
    ns = await namespace(real, podiam)
    pod = await start_pod(real, ns, "token-far")
    token = await pod_token(real, pod)
    status, body = await ask(far_agent, token)
    assert (status, body["code"]) == (403, "node-mismatch"), body
    assert "127.0.0.2" in body["message"]
    assert (await ask(agent, token))[0] == 200  # the pod's own node's agent serves it

    async def evented() -> bool:
        return any(e["reason"] == "PodiamNodeMismatch" for e in await real.events(ns))

    await eventually(evented, real.patience)


async def test_a_deleted_pods_token_is_refused_even_when_its_ip_is_reused_at_once(
    real, podiam, agent
):
    ns = await namespace(real, podiam)
    ip = next(_pod_ips)
    old = await start_pod(real, ns, "token-reused", ip=ip)
    token = await pod_token(real, old)
    assert (await ask(agent, token))[0] == 200
    await eventually(lambda: agent.token_endpoint.known(token) is not None, real.patience)
    deleted = await real.admin.delete(
        f"/api/v1/namespaces/{ns}/pods/{old['metadata']['name']}", gracePeriodSeconds="0"
    )
    assert deleted.ok
    await start_pod(real, ns, "token-reused", ip=ip)  # same IP, same role
    status, body = await ask(agent, token)
    assert status in (401, 403), body
    assert body["code"] in ("pod-gone", "invalid-token")


async def test_an_upgrade_keeps_the_endpoint_answering(real, podiam, tls_dirs):
    ns = await namespace(real, podiam)
    token = await pod_token(real, await start_pod(real, ns, "token-upgrade"))
    agents = dict(server_port=podiam.server.port, tls=tls_dirs, metadata="http://127.0.0.1:9")
    async with contextlib.AsyncExitStack() as old_agent:
        old = await old_agent.enter_async_context(running_agent(**agents, extra=_agent_flags()))
        await eventually(lambda: old.streams.synced_once.is_set(), 30)
        assert (await ask(old, token))[0] == 200
        # The new agent shares the old one's port (SO_REUSEPORT), as the DaemonSet's surge does.
        flags = ["--token-endpoint", "--token-port", str(old.token_port)]
        async with running_agent(**agents, extra=flags) as new:
            await eventually(new.ready, 30)
            await eventually(lambda: new.token_endpoint is not None, 30)
            for _ in range(20):
                assert (await ask(old, token))[0] == 200  # whichever agent takes it
            await old_agent.aclose()  # the old agent stops
            status, body = await ask(new, token)
            assert status == 200, body
            assert new.token_endpoint.known(token) is not None  # the new one answered


async def test_a_token_for_another_audience_is_refused(real, podiam, agent):
    ns = await namespace(real, podiam)
    pod = await start_pod(real, ns, "token-audience")
    status, body = await ask(agent, await pod_token(real, pod, audience="sts.amazonaws.com"))
    assert (status, body["code"]) == (401, "invalid-token"), body


async def test_a_role_the_namespace_does_not_permit_is_refused_by_token_too(real, podiam, agent):
    ns = await namespace(real, podiam, permitted="only-this")
    pod = await start_pod(real, ns, "something-else")
    status, body = await ask(agent, await pod_token(real, pod))
    assert (status, body["code"]) == (403, "not-permitted"), body


async def test_a_request_without_a_token_is_refused(agent):
    url = f"http://127.0.0.1:{agent.token_port}/v1/credentials"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 401
        assert (await response.json())["code"] == "token-required"


# --- the webhook, called by the real API server ------------------------------------------------

LABEL = "podiam.io/token-credentials"


@pytest_asyncio.fixture(scope="module")
async def webhook_registered(real: RealCluster, podiam, tls_dirs):
    """The chart's MutatingWebhookConfiguration, pointed at this test's server by URL."""
    rendered = helm.render({"tokenCredentials": {"enabled": True}}, name=RELEASE)
    config = helm.one(rendered, "MutatingWebhookConfiguration")
    hook = config["webhooks"][0]
    hook["clientConfig"] = {
        "url": f"https://127.0.0.1:{podiam.server.webhook_port}/mutate",
        "caBundle": base64.b64encode(tls_dirs.server.ca.read_bytes()).decode(),
    }
    path = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"
    created = await real.admin.post(path, config)
    assert created.ok, created.body
    try:
        yield
    finally:
        await real.admin.delete(f"{path}/{config['metadata']['name']}")


async def test_the_api_server_gives_pods_in_labelled_namespaces_a_token_and_the_variables(
    real, podiam, webhook_registered
):
    labelled = unique("hooked")
    plain = unique("plain")
    for name, labels in ((labelled, {LABEL: "enabled"}), (plain, {})):
        made = await real.admin.post(
            "/api/v1/namespaces", {"metadata": {"name": name, "labels": labels}}
        )
        assert made.ok, made.body

    async def create(ns: str) -> dict:
        body = {
            "metadata": {"generateName": "app-", "annotations": {ROLE: "hooked"}},
            "spec": {"containers": [{"name": "app", "image": "podiam.test/app:none"}]},
        }
        created: list[dict] = []

        async def made() -> bool:
            answer = await real.admin.post(f"/api/v1/namespaces/{ns}/pods", body)
            if answer.ok:
                created.append(answer.body)
            return answer.ok

        # Pods are refused until the namespace has its default ServiceAccount.
        await eventually(made, real.patience, interval=0.2)
        return created[0]

    hooked = await create(labelled)
    envs = {v["name"]: v["value"] for v in hooked["spec"]["containers"][0]["env"]}
    assert envs["AWS_CONTAINER_CREDENTIALS_FULL_URI"] == "http://169.254.170.23/v1/credentials"
    assert envs["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"].endswith("/token")
    (source,) = next(v for v in hooked["spec"]["volumes"] if v["name"] == "podiam-token")[
        "projected"
    ]["sources"]
    assert source["serviceAccountToken"]["audience"] == "podiam"
    untouched = await create(plain)
    assert "env" not in untouched["spec"]["containers"][0]


# --- real clients through their default chains ------------------------------------------------


def _client_env(agent, token_file: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_CONTAINER_CREDENTIALS_FULL_URI=f"http://127.0.0.1:{agent.token_port}/v1/credentials",
        AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=str(token_file),
        AWS_CONFIG_FILE="/dev/null",
        AWS_SHARED_CREDENTIALS_FILE="/dev/null",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_DEFAULT_REGION=REGION,
    )
    return env


async def _run(argv: list[str], env: dict[str, str]) -> str:
    # Not subprocess.run: the agent under test answers on this very event loop.
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_botocore_uses_the_endpoint_through_its_default_chain(
    real, podiam, agent, moto_sts, tmp_path
):
    ns = await namespace(real, podiam)
    pod = await start_pod(real, ns, "token-boto")
    token_file = tmp_path / "token"
    token_file.write_text(await pod_token(real, pod))
    script = (
        "import boto3, sys;"
        "s = boto3.Session();"
        "print(s.get_credentials().method);"
        f"print(s.client('sts', endpoint_url={moto_sts.endpoint_url!r})"
        ".get_caller_identity()['Arn'])"
    )
    output = await _run([sys.executable, "-c", script], _client_env(agent, token_file))
    method, arn = output.split()
    assert method == "container-role"
    assert ":assumed-role/token-boto/" in arn


async def test_the_aws_cli_uses_the_endpoint_through_its_default_chain(
    real, podiam, agent, moto_sts, tmp_path
):
    aws = Path(sys.executable).with_name("aws")
    if not aws.exists():
        pytest.skip("the AWS CLI is not installed in this environment")
    ns = await namespace(real, podiam)
    pod = await start_pod(real, ns, "token-cli")
    token_file = tmp_path / "token"
    token_file.write_text(await pod_token(real, pod))
    argv = [str(aws), "sts", "get-caller-identity", "--endpoint-url", moto_sts.endpoint_url,
            "--output", "json"]  # fmt: skip
    answer = json.loads(await _run(argv, _client_env(agent, token_file)))
    assert ":assumed-role/token-cli/" in answer["Arn"]


# The SDK matrix's programs (tests/clients/): each SDK's default chain, then GetCallerIdentity.
SDK_CLIENTS = [client for client in CLIENTS if client.name != "aws-cli"]  # the CLI: above


@pytest.mark.parametrize("client", SDK_CLIENTS, ids=[c.name for c in SDK_CLIENTS])
async def test_each_sdk_finds_the_endpoint_through_its_default_chain(
    client, real, podiam, agent, moto_sts, tmp_path
):
    build = built(client)
    ns = await namespace(real, podiam)
    role = f"token-{client.name.replace('.', '-')}"
    pod = await start_pod(real, ns, role)
    token_file = tmp_path / "token"
    token_file.write_text(await pod_token(real, pod))
    env = _client_env(agent, token_file)
    env.update(AWS_REGION=REGION, AWS_ENDPOINT_URL_STS=moto_sts.endpoint_url)
    lines = (await _run(client.argv(build), env)).splitlines()
    answer = json.loads(lines[-1])
    assert ":assumed-role/" + role + "/" in answer["arn"], answer
