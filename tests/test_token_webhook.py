"""The admission webhook that opts pods into token-bound credentials: real AdmissionReview
requests, over HTTPS to a running podiam server, and the JSON patches it answers applied with
jsonpatch (RFC 6902) to see the pod the API server would store."""

from __future__ import annotations

import base64
import copy
import json
import ssl
import uuid
from typing import Any

import aiohttp
import jsonpatch
import pytest
import pytest_asyncio

from server.webhook import FULL_URI, MOUNT_DIR, TOKEN_FILE, VOLUME
from tests.support.server import running_server

ROLE = "iam.amazonaws.com/role"
TOKEN_PATH = f"{MOUNT_DIR}/token"


@pytest.fixture(scope="module")
def server_flags() -> list[str]:
    return [
        "--webhook-bind", "127.0.0.1:0",
        "--webhook-endpoint", "http://169.254.170.24/v1/credentials",
        "--webhook-token-expiration", "15m",
    ]  # fmt: skip


@pytest_asyncio.fixture(scope="module")
async def webhook(kube, moto_sts, tls_dirs, tmp_path_factory, server_flags):
    tmp = tmp_path_factory.mktemp("webhook")
    async with running_server(kube, moto_sts, tls_dirs, tmp, extra=server_flags) as running:
        context = ssl.create_default_context(cafile=str(tls_dirs.server.ca))
        connector = aiohttp.TCPConnector(ssl=context)
        async with aiohttp.ClientSession(connector=connector) as session:
            yield Webhook(session, f"https://127.0.0.1:{running.server.webhook_port}/mutate")


class Webhook:
    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url

    async def review(self, pod: dict[str, Any], operation: str = "CREATE") -> dict[str, Any]:
        review = {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": str(uuid.uuid4()),
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "apps",
                "operation": operation,
                "object": pod,
            },
        }
        async with self.session.post(self.url, json=review) as response:
            assert response.status == 200
            answer = await response.json()
        assert answer["kind"] == "AdmissionReview"
        assert answer["response"]["uid"] == review["request"]["uid"]
        assert answer["response"]["allowed"] is True
        return answer["response"]

    async def admitted(self, pod: dict[str, Any]) -> dict[str, Any]:
        """The pod as the API server would store it after this webhook."""
        response = await self.review(pod)
        if "patch" not in response:
            return pod
        assert response["patchType"] == "JSONPatch"
        patch = json.loads(base64.b64decode(response["patch"]))
        return jsonpatch.apply_patch(pod, patch)


def pod(*containers: dict[str, Any], role: str | None = "reader", **spec: Any) -> dict[str, Any]:
    annotations = {ROLE: role} if role is not None else {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "app-", "namespace": "apps", "annotations": annotations},
        "spec": {"containers": list(containers) or [{"name": "app", "image": "app"}], **spec},
    }


def env(container: dict[str, Any]) -> dict[str, str]:
    return {var["name"]: var.get("value", "") for var in container.get("env", [])}


async def test_pod_with_a_role_gets_a_podiam_token_and_the_sdk_variables(webhook):
    admitted = await webhook.admitted(
        pod(
            {"name": "app", "image": "app"},
            {"name": "sidecar", "image": "s", "env": [{"name": "LOG", "value": "1"}]},
            initContainers=[{"name": "init", "image": "i"}],
        )
    )
    spec = admitted["spec"]
    (volume,) = spec["volumes"]
    assert volume == {
        "name": VOLUME,
        "projected": {
            "sources": [
                {
                    "serviceAccountToken": {
                        "audience": "podiam",
                        "expirationSeconds": 900,
                        "path": "token",
                    }
                }
            ]
        },
    }
    for container in [*spec["containers"], *spec["initContainers"]]:
        assert env(container)[FULL_URI] == "http://169.254.170.24/v1/credentials"
        assert env(container)[TOKEN_FILE] == TOKEN_PATH
        assert {"name": VOLUME, "mountPath": MOUNT_DIR, "readOnly": True} in container[
            "volumeMounts"
        ]
    assert env(spec["containers"][1])["LOG"] == "1"  # what was there stays


async def test_admitting_an_admitted_pod_again_changes_nothing(webhook):
    once = await webhook.admitted(pod(volumes=[{"name": "data", "emptyDir": {}}]))
    response = await webhook.review(copy.deepcopy(once))
    assert "patch" not in response
    assert [v["name"] for v in once["spec"]["volumes"]] == ["data", VOLUME]


async def test_pod_without_a_role_is_left_alone(webhook):
    response = await webhook.review(pod(role=None))
    assert "patch" not in response


async def test_a_container_that_sets_the_variables_itself_keeps_its_own(webhook):
    own = {"name": "own", "image": "o", "env": [{"name": FULL_URI, "value": "http://127.0.0.1:1"}]}
    admitted = await webhook.admitted(pod(own, {"name": "app", "image": "app"}))
    mine, other = admitted["spec"]["containers"]
    assert env(mine) == {FULL_URI: "http://127.0.0.1:1"}
    assert "volumeMounts" not in mine
    assert env(other)[TOKEN_FILE] == TOKEN_PATH


async def test_a_pod_that_mounts_the_volume_elsewhere_is_pointed_at_its_mount(webhook):
    mounted = {
        "name": "app",
        "image": "app",
        "volumeMounts": [{"name": VOLUME, "mountPath": "/podiam/"}],
    }
    volume = {"name": VOLUME, "projected": {"sources": []}}
    admitted = await webhook.admitted(pod(mounted, volumes=[volume]))
    (container,) = admitted["spec"]["containers"]
    assert env(container)[TOKEN_FILE] == "/podiam/token"
    assert admitted["spec"]["volumes"] == [volume]  # the pod's own volume is not replaced


async def test_updates_are_never_patched(webhook):
    response = await webhook.review(pod(), operation="UPDATE")
    assert "patch" not in response


async def test_what_is_not_an_admission_review_is_a_clear_400(webhook):
    async with webhook.session.post(webhook.url, data=b"{not json") as response:
        assert response.status == 400
        assert "AdmissionReview" in await response.text()
    async with webhook.session.post(webhook.url, json=["a list"]) as response:
        assert response.status == 400
