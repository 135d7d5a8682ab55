"""The mutating admission webhook that opts pods into token-bound credentials.

SDKs use the container-credentials provider when two environment variables are set:
``AWS_CONTAINER_CREDENTIALS_FULL_URI`` (the agent's endpoint) and
``AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`` (a file whose content they send as the
``Authorization`` header). The webhook gives every pod with an ``iam.amazonaws.com/role``
annotation both, and the file: a projected service-account token for audience ``podiam``,
short-lived, which the kubelet rotates before it expires. The pod's own settings win: a
container that sets either variable is left alone, and an existing volume of the same name
is not replaced. Applying the patch and reviewing the result again yields no patch
(idempotent), as the API server may call a webhook twice (``reinvocationPolicy``).

Which namespaces are opted in is the MutatingWebhookConfiguration's namespaceSelector; the
webhook's failurePolicy is Ignore, so an outage of this endpoint never blocks pod creation
(such pods fall back to the metadata API, which keeps working as before).

Served by podiam-server on its own TLS port (aiohttp), with the server certificate reloaded
when its files change.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from certs.tls import TlsFiles, files_stamp
from server import metrics
from server.pods import ROLE_ANNOTATION

log = logging.getLogger(__name__)

FULL_URI = "AWS_CONTAINER_CREDENTIALS_FULL_URI"
TOKEN_FILE = "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"
VOLUME = "podiam-token"
MOUNT_DIR = "/var/run/secrets/podiam.io/serviceaccount"
TOKEN_NAME = "token"
DEFAULT_ENDPOINT = "http://169.254.170.23/v1/credentials"
DEFAULT_EXPIRATION_SECONDS = 600  # the API server's minimum; the kubelet rotates at 80 %
MUTATE_PATH = "/mutate"
_MAX_BODY = 4 * 1024 * 1024  # AdmissionReviews of large pods run to hundreds of kilobytes


@dataclass(frozen=True, slots=True)
class InjectSettings:
    endpoint: str = DEFAULT_ENDPOINT
    audience: str = "podiam"
    expiration_seconds: int = DEFAULT_EXPIRATION_SECONDS


def _escape(key: str) -> str:
    """A JSON pointer segment (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")


def pod_patch(pod: dict[str, Any], settings: InjectSettings) -> list[dict[str, Any]]:
    """The JSON patch (RFC 6902) that opts ``pod`` in; empty when nothing is to change."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    if not (annotations.get(ROLE_ANNOTATION) or "").strip():
        return []
    spec = pod.get("spec") or {}
    ops: list[dict[str, Any]] = []
    volumes = spec.get("volumes")
    if not any(volume.get("name") == VOLUME for volume in volumes or ()):
        volume = {
            "name": VOLUME,
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": settings.audience,
                            "expirationSeconds": settings.expiration_seconds,
                            "path": TOKEN_NAME,
                        }
                    }
                ]
            },
        }
        if volumes is None:
            ops.append({"op": "add", "path": "/spec/volumes", "value": [volume]})
        else:
            ops.append({"op": "add", "path": "/spec/volumes/-", "value": volume})
    for kind in ("initContainers", "containers"):
        for index, container in enumerate(spec.get(kind) or ()):
            ops.extend(_container_ops(f"/spec/{kind}/{index}", container, settings))
    return ops


def _container_ops(
    path: str, container: dict[str, Any], settings: InjectSettings
) -> list[dict[str, Any]]:
    env = container.get("env")
    names = {var.get("name") for var in env or ()}
    if FULL_URI in names or TOKEN_FILE in names:
        return []  # configured by the pod's author: theirs to keep
    ops: list[dict[str, Any]] = []
    token_file = f"{MOUNT_DIR}/{TOKEN_NAME}"
    mounts = container.get("volumeMounts")
    if not any(mount.get("name") == VOLUME for mount in mounts or ()):
        mount = {"name": VOLUME, "mountPath": MOUNT_DIR, "readOnly": True}
        if mounts is None:
            ops.append({"op": "add", "path": f"{path}/volumeMounts", "value": [mount]})
        else:
            ops.append({"op": "add", "path": f"{path}/volumeMounts/-", "value": mount})
    else:
        mounted = next(m for m in mounts if m.get("name") == VOLUME)
        token_file = f"{mounted.get('mountPath', MOUNT_DIR).rstrip('/')}/{TOKEN_NAME}"
    added = [
        {"name": FULL_URI, "value": settings.endpoint},
        {"name": TOKEN_FILE, "value": token_file},
    ]
    if env is None:
        ops.append({"op": "add", "path": f"{path}/env", "value": added})
    else:
        ops.extend({"op": "add", "path": f"{path}/env/-", "value": var} for var in added)
    return ops


def review_response(review: dict[str, Any], settings: InjectSettings) -> dict[str, Any]:
    """The AdmissionReview answer to ``review``: always allowed, with a patch when needed."""
    request = review.get("request") or {}
    uid = request.get("uid") or ""
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    obj = request.get("object") or {}
    if request.get("kind", {}).get("kind") == "Pod" and request.get("operation") == "CREATE":
        ops = pod_patch(obj, settings)
        if ops:
            response["patchType"] = "JSONPatch"
            response["patch"] = base64.b64encode(json.dumps(ops).encode()).decode()
    return {
        "apiVersion": review.get("apiVersion") or "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    }


def webhook_app(settings: InjectSettings) -> web.Application:
    async def mutate(request: web.Request) -> web.Response:
        try:
            review = await request.json()
            if not isinstance(review, dict) or not isinstance(review.get("request"), dict):
                raise ValueError("not an AdmissionReview")
        except ValueError as error:
            metrics.WEBHOOK_REVIEWS.labels(outcome="bad-request").inc()
            return web.Response(status=400, text=f"expected an AdmissionReview: {error}\n")
        answer = review_response(review, settings)
        patched = "patch" in answer["response"]
        metrics.WEBHOOK_REVIEWS.labels(outcome="patched" if patched else "unchanged").inc()
        if patched:
            req = review["request"]
            obj = req.get("object") or {}
            name = (obj.get("metadata") or {}).get("name") or (
                (obj.get("metadata") or {}).get("generateName", "") + "*"
            )
            log.info("webhook: pod %s/%s opted into token-bound credentials",
                     req.get("namespace", ""), name)  # fmt: skip
        return web.json_response(answer)

    app = web.Application(client_max_size=_MAX_BODY)
    app.router.add_post(MUTATE_PATH, mutate)
    return app


class ReloadingContext:
    """A server SSLContext whose certificate is reloaded when its files change (rotation by
    cert-manager or a re-rendered chart Secret), for new connections."""

    def __init__(self, files: TlsFiles) -> None:
        self._files = files
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._stamp = files_stamp(files)
        self.context.load_cert_chain(files.cert, files.key)

    async def watch(self, every: float = 10.0) -> None:
        while True:
            await asyncio.sleep(every)
            stamp = files_stamp(self._files)
            if stamp == self._stamp:
                continue
            try:
                self.context.load_cert_chain(self._files.cert, self._files.key)
            except (OSError, ssl.SSLError) as error:
                log.warning("webhook certificate changed but cannot be loaded yet: %s", error)
                continue
            self._stamp = stamp
            log.info("webhook certificate reloaded")
