"""The agent's metadata API, every contract real SDKs rely on, over loopback: pods are clients
bound to their own 127.0.1.x addresses, the agent talks mutual-TLS gRPC to a real server, which
watches the Kubernetes API test server and assumes roles in moto."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime

import grpc
import pytest

from agent.client import ServerClient, ServerConnection, StreamFollower
from agent.lookup import PodLookup
from agent.refusal import Refused
from agent.state import NodeState
from server.identity import AwsCredentials
from tests.support.agent import pod_session, raw_get, running_agent
from tests.support.moto_sts import caller_arn
from tests.support.objects import PERMITTED
from tests.support.pods import NODE, add_pod, next_pod_ip
from tests.support.server import running_server
from tests.support.waiting import eventually

CREDS = "/latest/meta-data/iam/security-credentials/"
TOKEN_TTL = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN = "X-aws-ec2-metadata-token"


@pytest.fixture(scope="module")
def namespaces():
    return {"apps": "app-.*", "locked": None}


def url(agent, path: str) -> str:
    return f"http://{NODE}:{agent.port}{path}"


async def get(agent, ip: str, path: str, **kwargs):
    async with pod_session(ip) as http:
        async with http.get(url(agent, path), allow_redirects=False, **kwargs) as response:
            return response.status, await response.text(), response.headers


async def put_token(agent, ip: str, headers: dict[str, str]):
    async with pod_session(ip) as http:
        async with http.put(url(agent, "/latest/api/token"), headers=headers) as response:
            return response.status, await response.text(), response.headers


# ---- role and credentials ---------------------------------------------------------------------


async def test_pod_learns_its_role_name_as_plain_text_without_newline(agent, kube):
    ip = add_pod(kube, "apps", "namer", "app-namer")
    status, body, headers = await get(agent, ip, CREDS)
    assert (status, body) == (200, "app-namer")
    assert headers["Content-Type"].startswith("text/plain")


async def test_role_path_without_trailing_slash_redirects_to_it(agent, kube):
    ip = add_pod(kube, "apps", "slashless", "app-slashless")
    status, _, headers = await get(agent, ip, CREDS.rstrip("/"))
    assert status == 301
    assert headers["Location"] == CREDS


async def test_pod_gets_credentials_of_its_own_role_in_imds_format(agent, kube, moto_sts):
    ip = add_pod(kube, "apps", "worker", "app-worker")
    status, body, _ = await get(agent, ip, CREDS + "app-worker")
    assert status == 200
    document = json.loads(body)
    assert list(document) == [
        "Code", "LastUpdated", "Type", "AccessKeyId", "SecretAccessKey", "Token", "Expiration",
    ]  # fmt: skip
    assert document["Code"] == "Success" and document["Type"] == "AWS-HMAC"
    stamp = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
    assert stamp.match(document["Expiration"]) and stamp.match(document["LastUpdated"])
    expiration = datetime.strptime(document["Expiration"], "%Y-%m-%dT%H:%M:%SZ")
    creds = AwsCredentials(
        document["AccessKeyId"], document["SecretAccessKey"], document["Token"],
        expiration.replace(tzinfo=UTC), datetime.now(UTC),
    )  # fmt: skip
    assert creds.seconds_left() > 30 * 60
    who = await asyncio.to_thread(caller_arn, moto_sts.endpoint_url, creds)
    assert who.endswith(":assumed-role/app-worker/podiam-worker")


async def test_short_name_with_path_and_full_arn_list_the_bare_role_name(agent, kube):
    pathed = add_pod(kube, "apps", "pathed", "app-team/app-pathed")
    arn = add_pod(kube, "apps", "arned", "arn:aws:iam::123456789012:role/app-arned")
    assert (await get(agent, pathed, CREDS))[:2] == (200, "app-pathed")
    assert (await get(agent, arn, CREDS))[:2] == (200, "app-arned")
    assert (await get(agent, arn, CREDS + "app-arned"))[0] == 200


async def test_asking_for_a_role_that_is_not_the_pods_is_404(agent, kube):
    ip = add_pod(kube, "apps", "nosy", "app-nosy")
    assert (await get(agent, ip, CREDS + "app-nosy"))[0] == 200
    for other in ("app-other", "APP-NOSY", "app-nosy/", "app-nosy/x"):
        assert (await get(agent, ip, CREDS + other))[0] == 404, other


async def test_extended_credentials_path_is_404_so_sdks_fall_back(agent, kube):
    ip = add_pod(kube, "apps", "modern", "app-modern")
    for path in (
        "/latest/meta-data/iam/security-credentials-extended/",
        "/latest/meta-data/iam/security-credentials-extended/app-modern",
    ):
        assert (await get(agent, ip, path))[0] == 404


async def test_iam_info_describes_the_pods_role_not_the_nodes(agent, kube):
    ip = add_pod(kube, "apps", "curious", "app-curious")
    await get(agent, ip, CREDS + "app-curious")  # credentials have arrived
    status, body, _ = await get(agent, ip, "/latest/meta-data/iam/info")
    assert status == 200
    info = json.loads(body)
    assert info["Code"] == "Success"
    assert info["InstanceProfileArn"] == "arn:aws:iam::123456789012:instance-profile/app-curious"
    assert re.match(r"^AIPA[A-Z2-7]{17}$", info["InstanceProfileId"])


async def test_forbidden_pod_gets_no_credentials_and_no_node_credentials(agent, kube):
    ip = add_pod(kube, "apps", "thief", "admin")  # apps permits app-.* only
    status, body, _ = await get(agent, ip, CREDS)
    assert status == 403 and "not permitted" in body
    assert (await get(agent, ip, CREDS + "admin"))[0] == 403
    assert (await get(agent, ip, CREDS + "default-role"))[0] != 200  # moto's node role


async def test_pod_without_role_gets_404_for_its_role(agent, kube):
    ip = add_pod(kube, "apps", "roleless", None)
    assert (await get(agent, ip, CREDS))[0] == 404
    assert (await get(agent, ip, "/latest/meta-data/iam/info"))[0] == 404


async def test_unknown_caller_is_refused_within_the_sdk_budget(agent):
    started = asyncio.get_running_loop().time()
    status, _, _ = await get(agent, "127.0.200.1", CREDS)
    assert status == 404
    # --pod-wait (0.9s) bounds the wait; this checks the bound is honoured, with slack.
    assert asyncio.get_running_loop().time() - started < 5


async def test_pod_starting_after_its_request_is_answered_when_the_stream_brings_it(agent, kube):
    ip = next_pod_ip(kube)
    request = asyncio.create_task(get(agent, ip, CREDS + "app-late"))
    await eventually(lambda: agent.state.waiting == 1)  # the request waits for the stream
    add_pod(kube, "apps", "late", "app-late", ip=ip)
    status, body, _ = await request
    assert status == 200 and json.loads(body)["Code"] == "Success"


async def test_deleted_pod_stops_being_served_at_once(agent, kube):
    ip = add_pod(kube, "apps", "leaver", "app-leaver")
    assert (await get(agent, ip, CREDS + "app-leaver"))[0] == 200
    kube.delete_pod("apps", "leaver")
    await eventually(lambda: ip not in agent.state.pods)
    assert (await get(agent, ip, CREDS + "app-leaver"))[0] == 404


async def test_reused_ip_in_another_namespace_gets_only_the_new_pods_answer(agent, kube):
    kube.add_namespace("second", annotations={PERMITTED: "second-.*"})
    ip = add_pod(kube, "apps", "first-owner", "app-first")
    assert (await get(agent, ip, CREDS))[1] == "app-first"
    kube.delete_pod("apps", "first-owner")
    add_pod(kube, "second", "second-owner", "second-role", ip=ip)
    await eventually(lambda: getattr(agent.state.pods.get(ip), "role", "") == "second-role")
    assert (await get(agent, ip, CREDS))[1] == "second-role"
    assert (await get(agent, ip, CREDS + "app-first"))[0] == 404
    status, body, _ = await get(agent, ip, CREDS + "second-role")
    assert status == 200 and json.loads(body)["Code"] == "Success"


# ---- IMDSv2 ------------------------------------------------------------------------------------


async def test_token_is_minted_with_the_ttl_echoed(agent, kube):
    ip = add_pod(kube, "apps", "v2", "app-v2")
    status, token, headers = await put_token(agent, ip, {TOKEN_TTL: "21600"})
    assert status == 200 and token
    assert headers[TOKEN_TTL] == "21600"
    status, body, _ = await get(agent, ip, CREDS, headers={TOKEN: token})
    assert (status, body) == (200, "app-v2")


@pytest.mark.parametrize("ttl", [None, "", "0", "21601", "-5", "abc", "1.5"])
async def test_token_request_without_a_valid_ttl_is_400(agent, ttl):
    headers = {} if ttl is None else {TOKEN_TTL: ttl}
    assert (await put_token(agent, "127.0.9.1", headers))[0] == 400


@pytest.mark.parametrize("ttl", ["²", "①", "١٢", "\uff16\uff10", "1" * 40, "0060 0"])
async def test_token_ttl_in_other_digits_or_huge_is_400_never_5xx(agent, ttl):
    # Sent as raw UTF-8 bytes: "²" and "①" pass str.isdigit() but not int(); "١٢" and fullwidth
    # "60" pass both, yet are no TTL an SDK sends.
    status, _ = await raw_get(
        "127.0.9.3", agent.port, "/latest/api/token", method="PUT",
        headers=f"{TOKEN_TTL}: {ttl}\r\n",
    )  # fmt: skip
    assert status == 400


async def test_forwarded_token_request_is_403(agent):
    headers = {TOKEN_TTL: "60", "X-Forwarded-For": "10.0.0.1"}
    assert (await put_token(agent, "127.0.9.2", headers))[0] == 403


async def test_invalid_token_is_401(agent, kube):
    ip = add_pod(kube, "apps", "forger", "app-forger")
    for token in ("garbage", "A" * 44, ""):
        assert (await get(agent, ip, CREDS, headers={TOKEN: token}))[0] == 401


async def test_token_from_one_pod_is_worthless_to_another(agent, kube):
    a = add_pod(kube, "apps", "token-owner", "app-owner")
    b = add_pod(kube, "apps", "token-thief", "app-thief")
    _, token, _ = await put_token(agent, a, {TOKEN_TTL: "300"})
    assert (await get(agent, a, CREDS, headers={TOKEN: token}))[0] == 200
    assert (await get(agent, b, CREDS, headers={TOKEN: token}))[0] == 401


async def test_expired_token_is_401(agent, kube):
    ip = add_pod(kube, "apps", "patient", "app-patient")
    _, token, _ = await put_token(agent, ip, {TOKEN_TTL: "1"})
    await asyncio.sleep(2.1)
    assert (await get(agent, ip, CREDS, headers={TOKEN: token}))[0] == 401


async def test_require_imdsv2_refuses_credentials_without_a_token(podiam, kube, moto_sts, tls_dirs):
    async with running_agent(
        server_port=podiam.server.port,
        tls=tls_dirs,
        metadata=moto_sts.endpoint_url,
        extra=["--require-imdsv2"],
    ) as strict:
        await asyncio.wait_for(strict.follower.synced_once.wait(), 15)
        ip = add_pod(kube, "apps", "strict", "app-strict")
        assert (await get(strict, ip, CREDS))[0] == 401
        assert (await get(strict, ip, CREDS + "app-strict"))[0] == 401
        _, token, _ = await put_token(strict, ip, {TOKEN_TTL: "60"})
        assert (await get(strict, ip, CREDS + "app-strict", headers={TOKEN: token}))[0] == 200


# ---- other paths --------------------------------------------------------------------------------


async def test_allowed_paths_are_proxied_to_the_metadata_service(agent):
    status, body, _ = await get(agent, "127.0.9.3", "/latest/meta-data/placement/region")
    assert (status, body) == (200, "us-east-1")
    status, body, _ = await get(agent, "127.0.9.3", "/latest/meta-data/placement/availability-zone")
    assert (status, body) == (200, "us-east-1a")


@pytest.mark.parametrize(
    "path",
    [
        "/latest/user-data",
        "/latest/meta-data/",
        "/latest/meta-data/iam/",
        "/latest/meta-data/instance-id",
        "/latest/meta-data/placement/region/",
        "/2009-04-04/meta-data/iam/security-credentials/default-role",
    ],
)
async def test_paths_off_the_allow_list_are_404_naming_the_allow_list(agent, path):
    status, body, _ = await get(agent, "127.0.9.4", path)
    assert status == 404
    assert "allow-route-regexp" in body


@pytest.mark.parametrize(
    "path",
    [
        "/latest/meta-data/iam/security-credentials/../info",
        "/latest/meta-data/iam/security-credentials/./",
        "/latest/meta-data//iam/security-credentials/",
        "/latest/meta-data/iam/security-credentials/%2e%2e/info",
        "/latest/meta-data/iam%2fsecurity-credentials/",
        "/latest/meta-data/placement/region%2f..%2f..%2fuser-data",
        "/latest/meta-data/placement/%72egion",
        "/latest/" + "a" * 2000,
    ],
)
async def test_path_tricks_are_refused_before_any_route(agent, kube, path):
    ip = add_pod(kube, "apps", f"trick-{abs(hash(path)) % 10**8}", "app-trick")
    assert (await get(agent, ip, CREDS))[0] == 200
    status, body = await raw_get(ip, agent.port, path)
    assert status in (400, 404), body
    assert "AccessKeyId" not in body and "app-trick" not in body and "us-east-1" not in body


async def test_query_strings_do_not_change_the_route(agent, kube):
    ip = add_pod(kube, "apps", "queried", "app-queried")
    assert (await raw_get(ip, agent.port, CREDS + "?role=admin")) == (200, "app-queried")
    status, _ = await raw_get(
        ip, agent.port, "/latest/user-data?/latest/meta-data/placement/region"
    )
    assert status == 404


@pytest.mark.parametrize("method", ["POST", "DELETE", "PATCH", "OPTIONS", "PUT"])
async def test_odd_methods_are_405(agent, method):
    async with pod_session("127.0.9.5") as http:
        async with http.request(method, url(agent, CREDS)) as response:
            assert response.status == 405


async def test_huge_headers_are_refused(agent):
    status, _, _ = await get(agent, "127.0.9.6", CREDS, headers={"X-Big": "x" * 20000})
    assert status in (400, 431)


# ---- health, metrics, start-up ------------------------------------------------------------------


async def test_ping_and_health(agent):
    assert (await get(agent, "127.0.9.7", "/ping"))[:2] == (200, "pong")
    assert (await get(agent, "127.0.9.7", "/health"))[0] == 200
    assert (await get(agent, "127.0.9.7", "/health?deep=1"))[0] == 200


async def test_metrics_count_requests_by_route(agent):
    await get(agent, "127.0.9.8", "/ping")
    async with pod_session("127.0.0.1") as http:
        async with http.get(f"http://127.0.0.1:{agent.metrics_port}/metrics") as response:
            text = await response.text()
    assert 'podiam_agent_requests_total{route="ping",status="200"}' in text
    assert "podiam_agent_node_stream_connected 1.0" in text


async def test_agent_without_a_server_serves_ping_but_no_credentials(tls_dirs, moto_sts):
    async with running_agent(server_port=1, tls=tls_dirs, metadata=moto_sts.endpoint_url) as lone:
        assert (await get(lone, "127.0.9.9", "/ping"))[0] == 200
        assert (await get(lone, "127.0.9.9", "/health"))[0] == 503
        status, body, _ = await get(lone, "127.0.9.9", CREDS)
        assert status == 503 and "not connected" in body


async def test_ready_file_exists_exactly_while_the_agent_can_serve_from_the_stream(
    podiam, tls_dirs, moto_sts, tmp_path
):
    # The readiness probe's answer, from this process alone (another agent may share the port).
    ready = tmp_path / "ready"
    ready.write_text("left by a killed agent\n")
    extra = ["--ready-file", str(ready)]
    metadata = moto_sts.endpoint_url
    async with running_agent(server_port=1, tls=tls_dirs, metadata=metadata, extra=extra) as lone:
        assert not ready.exists(), "a stale ready file must not claim readiness"
        await asyncio.sleep(1.5)  # several readiness checks without a server
        assert not ready.exists() and not lone.ready()
    port = podiam.server.port
    async with running_agent(server_port=port, tls=tls_dirs, metadata=metadata, extra=extra) as a:
        await eventually(ready.exists, timeout=15)
        assert a.ready() and a.state.live
    assert not ready.exists(), "a stopping agent is not ready"


async def test_without_the_stream_unary_calls_answer(podiam, kube, tls_dirs):
    # A lookup whose stream state is not live: every answer comes from the unary RPCs.
    ip = add_pod(kube, "apps", "unary", "app-unary")
    await eventually(lambda: podiam.server.registry.lookup(ip).pod is not None)
    connection = ServerConnection(f"127.0.0.1:{podiam.server.port}", tls_dirs.agent)
    connected = asyncio.Event()
    connected.set()
    lookup = PodLookup(NodeState(), ServerClient(connection), pod_wait=0.9, synced_once=connected)
    try:
        assert (await lookup.entry(ip)).role_name == "app-unary"
        assert json.loads(await lookup.credentials(ip, "app-unary"))["Code"] == "Success"
        with pytest.raises(Refused) as refused:
            await lookup.credentials(ip, "app-other")
        assert refused.value.status == 404
        forbidden = add_pod(kube, "apps", "unary-thief", "admin")
        await eventually(lambda: podiam.server.registry.lookup(forbidden).pod is not None)
        with pytest.raises(Refused) as refused:
            await lookup.entry(forbidden)
        assert refused.value.status == 403
    finally:
        await connection.close()
    assert grpc  # the unary path above used real gRPC over TLS


async def test_a_server_address_that_never_answers_is_reported_and_retried(tls_dirs, caplog):
    # A listener that accepts connections and never speaks: TLS never completes, the stream
    # never starts. The agent must say so and try again, not wait silently.
    silent = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    connection = ServerConnection(f"127.0.0.1:{port}", tls_dirs.agent)
    follower = StreamFollower(
        ServerClient(connection), NodeState(), host_ip=NODE, server=f"127.0.0.1:{port}",
        first_update_seconds=0.3,
    )  # fmt: skip
    task = asyncio.create_task(follower.run())
    try:
        await eventually(lambda: "no snapshot within 0.3s" in caplog.text, timeout=10)
        assert not follower.synced_once.is_set()
        # Nothing was ever streamed, so nothing was "lost": the log says what happened.
        assert f"cannot open the node stream from podiam server 127.0.0.1:{port}" in caplog.text
        assert "lost" not in caplog.text
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await connection.close()
        silent.close()


async def test_a_stream_that_ended_after_its_snapshot_is_reported_lost(
    kube, moto_sts, tls_dirs, tmp_path, caplog
):
    async with running_server(kube, moto_sts, tls_dirs, tmp_path) as own:
        address = f"127.0.0.1:{own.server.port}"
        connection = ServerConnection(address, tls_dirs.agent)
        follower = StreamFollower(
            ServerClient(connection), NodeState(), host_ip=NODE, server=address
        )
        task = asyncio.create_task(follower.run())
        try:
            await asyncio.wait_for(follower.synced_once.wait(), 15)
            await own.server.stop(grace=1)
            await eventually(
                lambda: f"node stream from podiam server {address} lost" in caplog.text
            )
            assert "cannot open" not in caplog.text.split(" lost ")[0]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await connection.close()
