"""Real Helm for the chart tests: Helm's own Go SDK through ``helm_python`` (no binary), and a
small Kubernetes API for Helm's ``lookup`` to read existing Secrets from.

``Chart.render`` renders offline, where ``lookup`` finds nothing, which is what a first install
sees. An upgrade sees the release's objects: ``Config.render`` renders cluster-aware, and
``SecretsApi`` is the cluster it reads. It serves what client-go's dynamic client asks for to
get one object: discovery of core/v1 (``/api``, ``/apis``, ``/api/v1``) and
``GET /api/v1/namespaces/{ns}/secrets/{name}``, with the API server's 404 Status for anything
absent. This module would be unnecessary if Helm's SDK could render against a fake client set.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "podiam"
RELEASE = "podiam"
NAMESPACE = "kube-system"

Manifest = dict[str, Any]


def render(
    values: Mapping[str, Any] | None = None,
    *,
    name: str = RELEASE,
    namespace: str = NAMESPACE,
    cluster: helm.Config | None = None,
    upgrade: bool = False,
) -> list[Manifest]:
    """Every object the chart renders, parsed; offline unless ``cluster`` is given."""
    with helm.Chart.load(CHART) as chart:
        options = {
            "name": name,
            "namespace": namespace,
            "is_install": not upgrade,
            "is_upgrade": upgrade,
            "revision": 2 if upgrade else 1,
        }
        if cluster is None:
            rendered = chart.render(dict(values or {}), **options)
        else:
            rendered = cluster.render(chart, dict(values or {}), **options)
    return parse(rendered)


def parse(rendered: Mapping[str, str]) -> list[Manifest]:
    manifests = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        manifests.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return manifests


def notes(values: Mapping[str, Any] | None = None) -> str:
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(dict(values or {}), name=RELEASE, namespace=NAMESPACE)
    return next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))


def one(manifests: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = [
        m
        for m in manifests
        if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(manifests: list[Manifest], kind: str) -> dict[str, Any]:
    """The first container of the only workload of ``kind`` (Deployment, DaemonSet)."""
    return one(manifests, kind)["spec"]["template"]["spec"]["containers"][0]


class SecretsApi:
    """A Kubernetes API server holding Secrets, enough for Helm's ``lookup``."""

    _SECRET = re.compile(r"^/api/v1/namespaces/([^/]+)/secrets/([^/?]+)$")

    def __init__(self) -> None:
        self.secrets: dict[tuple[str, str], Manifest] = {}
        self.requests: list[str] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                api.requests.append(self.path)
                status, body = api._answer(self.path.split("?", 1)[0])
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"

    def add_secrets(self, manifests: list[Manifest]) -> None:
        """Store the Secrets among ``manifests`` as a release would have created them."""
        for m in manifests:
            if m["kind"] == "Secret":
                key = (m["metadata"]["namespace"], m["metadata"]["name"])
                self.secrets[key] = {**m, "apiVersion": "v1"}

    def _answer(self, path: str) -> tuple[int, Any]:
        if path == "/version":
            return 200, {"major": "1", "minor": "33", "gitVersion": "v1.33.0"}
        if path == "/api":
            return 200, {"kind": "APIVersions", "versions": ["v1"]}
        if path == "/apis":
            return 200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": []}
        if path == "/api/v1":
            return 200, {
                "kind": "APIResourceList",
                "groupVersion": "v1",
                "resources": [
                    {
                        "name": "secrets",
                        "singularName": "secret",
                        "namespaced": True,
                        "kind": "Secret",
                        "verbs": ["get", "list", "watch"],
                    }
                ],
            }
        match = self._SECRET.match(path)
        if match and (secret := self.secrets.get((match[1], match[2]))) is not None:
            return 200, secret
        return 404, {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "reason": "NotFound",
            "code": 404,
            "message": f"{path} not found",
        }

    def kubeconfig(self) -> str:
        return yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "test", "cluster": {"server": self.url}}],
                "users": [{"name": "test", "user": {"token": "test"}}],
                "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
                "current-context": "test",
            }
        )

    @contextmanager
    def running(self) -> Iterator[helm.Config]:
        """Serve, and yield a Helm configuration pointing at this API server."""
        thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        thread.start()
        try:
            with helm.Config(kubeconfig_content=self.kubeconfig(), namespace=NAMESPACE) as config:
                yield config
        finally:
            self._http.shutdown()
            self._http.server_close()
            thread.join()
