"""``podiam-server explain NAMESPACE/POD`` against a running server: the real command (its own
process, over the server's mutual-TLS gRPC port), the Kubernetes API test server, moto as STS.
Each test uses its own pods on one module-wide server."""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from protos import kiam_pb2
from server.explain_cli import build_parser
from server.service import is_local
from tests.support.helm import container, render
from tests.support.pods import NODE, add_pod, next_pod_ip
from tests.support.server import BASE_ARN, indexed, refused
from tests.support.waiting import eventually

OTHER_ACCOUNT_ROLE = "arn:aws:iam::999999999999:role/app-elsewhere"


@pytest.fixture(scope="module")
def namespaces():
    return {"apps": "app-.*", "closed": None, "broken": "(app)\\1"}


@dataclass
class Explained:
    code: int
    out: str
    err: str

    def line(self, check: str) -> str:
        """The printed line of one step."""
        return next(line for line in self.out.splitlines() if f"  {check} " in line + " ")


async def explain(podiam, pod: str, *extra: str) -> Explained:
    files = podiam.tls.agent
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "explain", pod,
        "--server-address", podiam.target,
        "--cert", str(files.cert), "--key", str(files.key), "--ca", str(files.ca),
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    return Explained(process.returncode, out.decode(), err.decode())


async def known(podiam, namespace: str, name: str) -> None:
    await eventually(lambda: podiam.server.registry.pod(namespace, name)[0] is not None)


async def test_permitted_pod_is_served_and_every_step_passes(podiam, kube, stub, sts):
    ip = add_pod(kube, "apps", "web", "app-web")
    await indexed(podiam, ip)
    creds = await stub.GetPodCredentials(kiam_pb2.GetPodCredentialsRequest(ip=ip, role="app-web"))
    result = await explain(podiam, "apps/web")
    assert result.code == 0, result.out + result.err
    for check in ("pod found", "active", "IP unique", "role annotation", "role ARN"):
        assert result.line(check).lstrip().startswith("ok"), result.out
    assert "matches 'app-web'" in result.line("pattern matches")
    assert f"only the agent on node {NODE}" in result.line("node binding")
    assert "session name 'podiam-web'" in result.line("identity")
    assert creds.access_key_id in result.line("credentials cached")
    assert result.line("last STS error").lstrip().startswith("ok")
    assert f"answer: credentials for {BASE_ARN}app-web (AccessKeyId {creds.access_key_id}" in (
        result.out
    )
    assert "fix:" not in result.out
    # Never a secret: not the secret key, not the session token.
    assert creds.secret_access_key not in result.out and creds.token not in result.out


async def test_json_output_carries_the_same_answer(podiam, kube, stub):
    ip = add_pod(kube, "apps", "json-web", "app-json")
    await indexed(podiam, ip)
    await stub.GetPodCredentials(kiam_pb2.GetPodCredentialsRequest(ip=ip, role="app-json"))
    result = await explain(podiam, "apps/json-web", "--json")
    answer = json.loads(result.out)
    assert result.code == 0 and answer["served"] is True
    outcomes = {step["check"]: step["outcome"] for step in answer["steps"]}
    assert outcomes["pattern matches"] == "pass" and outcomes["node binding"] == "info"


REFUSALS = [
    # (namespace, role, extra pod fields, reason, the failing step, words of the fix)
    ("apps", None, {}, "no-role", "role annotation", "annotate the pod"),
    ("apps", "admin", {}, "not-permitted", "pattern matches", "--overwrite"),
    ("closed", "app-web", {}, "no-permitted", "permitted pattern", "app-web'"),
    ("broken", "app-web", {}, "invalid-permitted", "permitted pattern", "RE2 syntax"),
    ("apps", "app-x/../admin", {}, "invalid-role", "role ARN", "correct the pod's"),
    ("apps", OTHER_ACCOUNT_ROLE, {}, "account-not-allowed", "account allowed", "999999999999"),
    ("nowhere", "app-web", {}, "unknown-namespace", "namespace known", "RBAC"),
    ("apps", "app-web", {"host_network": True}, "host-network", "active", "hostNetwork"),
]


@pytest.mark.parametrize(
    ("namespace", "role", "fields", "reason", "check", "fix"),
    REFUSALS,
    ids=[case[3] for case in REFUSALS],
)
async def test_each_refusal_names_its_failing_step_and_a_fix(
    podiam, kube, namespace, role, fields, reason, check, fix
):
    name = f"refused-{reason}"
    add_pod(kube, namespace, name, role, **fields)
    await known(podiam, namespace, name)
    result = await explain(podiam, f"{namespace}/{name}")
    assert result.code == 2, result.out + result.err
    assert result.line(check).lstrip().startswith("NO"), result.out
    fix_line = next(line for line in result.out.splitlines() if line.startswith("fix:"))
    assert fix in fix_line
    # Steps after the failing one are not judged.
    assert result.line("credentials cached").lstrip().startswith(".."), result.out
    answer = json.loads((await explain(podiam, f"{namespace}/{name}", "--json")).out)
    assert answer["reason"] == reason and answer["served"] is False


async def test_not_permitted_shows_the_pattern_and_what_it_was_matched_against(podiam, kube):
    add_pod(kube, "apps", "intruder", "admin")
    await known(podiam, "apps", "intruder")
    result = await explain(podiam, "apps/intruder")
    assert "iam.amazonaws.com/permitted='app-.*'" in result.line("permitted pattern")
    assert f"neither short name 'admin' nor ARN '{BASE_ARN}admin'" in result.line("pattern matches")
    assert "kubectl annotate namespace apps --overwrite" in result.out
    assert "'app-.*|admin'" in result.out


async def test_two_pods_on_one_ip_are_ambiguous(podiam, kube):
    ip = next_pod_ip(kube)
    add_pod(kube, "apps", "twin-a", "app-twin", ip=ip)
    add_pod(kube, "apps", "twin-b", "app-twin", ip=ip)
    await eventually(lambda: len(podiam.server.registry.pods_with_ip(ip)) == 2)
    result = await explain(podiam, "apps/twin-a")
    assert result.code == 2
    assert "apps/twin-b" in result.line("IP unique")
    assert "remove the other pod(s)" in result.out


async def test_pod_without_an_ip_is_not_served_yet(podiam, kube):
    kube.add_pod("apps", "pending", host_ip=NODE, phase="Pending", annotations={
        "iam.amazonaws.com/role": "app-pending"
    })  # fmt: skip
    await known(podiam, "apps", "pending")
    result = await explain(podiam, "apps/pending")
    assert result.code == 2 and "no IP yet" in result.line("active")


async def test_unknown_pod_is_not_found(podiam):
    result = await explain(podiam, "apps/nobody")
    assert result.code == 2
    assert "holds no pod apps/nobody" in result.line("pod found")
    assert "kubectl get pod" in result.out


async def test_pod_whose_sts_call_failed_shows_the_error_then_recovers(podiam, kube, sts):
    sts.set_failing(True, "AccessDenied")
    add_pod(kube, "apps", "denied-by-sts", "app-untrusted")
    identity_failed = _last_error_set(podiam, "apps", "denied-by-sts")
    await eventually(identity_failed, timeout=15)
    result = await explain(podiam, "apps/denied-by-sts")
    assert result.code == 2, result.out
    assert "AccessDenied" in result.line("last STS error")
    assert result.line("credentials cached").lstrip().startswith("NO")
    assert "answer: no credentials: the agent answers 503 (STS said AccessDenied)" in result.out
    assert f"let the server assume {BASE_ARN}app-untrusted" in result.out
    assert "trust policy" in result.out

    sts.set_failing(False)
    # The cache retries with backoff (1 s, doubling): the next success serves the pod.
    await eventually(lambda: _cached(podiam, "apps", "denied-by-sts"), timeout=30)
    result = await explain(podiam, "apps/denied-by-sts")
    assert result.code == 0, result.out
    assert "succeeded since" in result.line("last STS error")


async def test_wrong_client_certificate_cannot_ask(podiam):
    files = podiam.tls.foreign_agent
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "explain", "apps/web",
        "--server-address", podiam.target, "--timeout", "3s",
        "--cert", str(files.cert), "--key", str(files.key), "--ca", str(files.ca),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _out, err = await process.communicate()
    assert process.returncode == 1
    assert "podiam-server explain: the server at" in err.decode()


async def test_explain_rpc_without_a_pod_name_is_invalid(stub):
    error = await refused(stub.ExplainPod(kiam_pb2.ExplainPodRequest(namespace="apps")))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_only_loopback_callers_count_as_the_servers_own_host():
    assert is_local("127.0.0.1") and is_local("127.3.2.1") and is_local("::1")
    assert not is_local("10.0.0.7") and not is_local("192.168.1.1") and not is_local("fd00::1")
    assert not is_local(None) and not is_local("not-an-ip")


def _last_error_set(podiam, namespace: str, name: str):
    def check() -> bool:
        state = _state(podiam, namespace, name)
        return state is not None and state.last_error is not None

    return check


def _cached(podiam, namespace: str, name: str) -> bool:
    state = _state(podiam, namespace, name)
    return state is not None and state.credentials is not None


def _state(podiam, namespace: str, name: str):
    _pod, grant = podiam.server.registry.pod(namespace, name)
    if grant is None or grant.identity is None:
        return None
    return podiam.server.cache.state(grant.identity)


def test_defaults_reach_the_server_in_its_pod_as_the_chart_runs_it():
    """`kubectl exec deploy/podiam-server -- podiam-server explain NS/POD` needs no flags: the
    defaults are the chart's gRPC port and the client certificate it mounts for the probes."""
    server = container(render({"server": {"roleBaseArn": BASE_ARN}}), "Deployment")
    args = build_parser(environ={}).parse_args(["apps/web"])
    assert args.server_address == ("127.0.0.1", server["ports"][0]["containerPort"])
    mounts = {mount["name"]: mount["mountPath"] for mount in server["volumeMounts"]}
    assert args.cert.parent == args.key.parent == args.ca.parent == Path(mounts["probe-tls"])
    probe = server["readinessProbe"]["exec"]["command"]
    assert [str(args.cert), str(args.key), str(args.ca)] == probe[-3:]
