"""``python -m bench.token_path``: the token-bound endpoint's hot path beside the metadata hot
path, in one agent, same pods, same load generator, same run.

Needs the real control plane (tests/controlplane/build.sh): the tokens come from the
TokenRequest API and the server reviews them with TokenReview, as in a cluster. The agent runs
as its own process pinned to one core, the load generator (bench/loadgen.py) on the other.
Each pod asks from its own 127.x source address: its credentials through the metadata path,
and through /v1/credentials with its own token. Only answers from memory are timed (every
token has been answered once and its pod is in the agent's node stream before the run).

Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import aiohttp

from bench import procs
from bench.cluster import CREDENTIALS, pod_ip
from tests.support.clusters import podiam_server
from tests.support.controlplane import (
    NODE_IP,
    POD_IP_ANNOTATION,
    ControlPlane,
    admin_client,
    running_control_plane,
)
from tests.support.moto_sts import MotoSts
from tests.support.tls import make_tls_dirs

NAMESPACE = "bench-token"
TOKEN_PATH = "/v1/credentials"


async def _namespace(admin) -> str:
    base = f"/api/v1/namespaces/{NAMESPACE}"
    if (await admin.get(base)).ok:
        return base
    annotations = {"iam.amazonaws.com/permitted": ".*"}
    metadata = {"name": NAMESPACE, "annotations": annotations}
    await admin.post("/api/v1/namespaces", {"metadata": metadata})
    # Pods are refused until the controller manager made the default ServiceAccount.
    for _ in range(300):
        if (await admin.get(f"{base}/serviceaccounts/default")).ok:
            break
        await asyncio.sleep(0.2)
    return base


async def _pod_with_token(admin, plane: ControlPlane, base: str, name: str, ip: str) -> str:
    """Create a running-to-be pod and return a token bound to it (TokenRequest)."""
    pod = {
        "metadata": {"name": name, "annotations": {
            "iam.amazonaws.com/role": "bench-token-role",
            "iam.amazonaws.com/session-name": "bench-token-app",
            POD_IP_ANNOTATION: ip}},
        "spec": {"nodeName": plane.node_names[0], "automountServiceAccountToken": False,
                 "containers": [{"name": "app", "image": "podiam.test/app:none"}]},
    }  # fmt: skip
    created = await admin.post(f"{base}/pods", pod)
    assert created.ok, created.body
    meta = created.body["metadata"]
    bound = {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]}
    spec = {"audiences": ["podiam"], "expirationSeconds": 3600, "boundObjectRef": bound}
    answer = await admin.post(f"{base}/serviceaccounts/default/token", {"spec": spec})
    assert answer.ok, answer.body
    return answer.body["status"]["token"]


async def _pods(plane: ControlPlane, count: int) -> list[tuple[str, str, str]]:
    """``count`` pods sharing one role and workload: (ip, role, token) each."""
    pods = []
    async with admin_client(plane) as admin:
        base = await _namespace(admin)
        for k in range(count):
            ip = pod_ip(k, block=2)
            token = await _pod_with_token(admin, plane, base, f"tok-{k}", ip)
            pods.append((ip, "bench-token-role", token))
    return pods


async def _pod_start(plane: ControlPlane, token_port: int, count: int) -> dict:
    """Pod created → first credentials through the endpoint, one pod at a time, each asking
    as soon as it has its token (a real pod's containers start only after the kubelet has
    mounted it). Seconds: from the pod's creation, and from its token."""
    from_create, from_token = [], []
    url = f"http://{NODE_IP}:{token_port}{TOKEN_PATH}"
    async with admin_client(plane) as admin:
        base = await _namespace(admin)
        for k in range(count):
            ip = pod_ip(k, block=3)
            started = time.perf_counter()
            token = await _pod_with_token(admin, plane, base, f"start-{k}", ip)
            have_token = time.perf_counter()
            connector = aiohttp.TCPConnector(local_addr=(ip, 0))
            async with aiohttp.ClientSession(connector=connector) as session:
                for _ in range(500):
                    async with session.get(url, headers={"Authorization": token}) as response:
                        if response.status == 200:
                            break
                    await asyncio.sleep(0.01)
                else:
                    raise RuntimeError(f"pod start-{k} got no credentials")
            done = time.perf_counter()
            from_create.append(done - started)
            from_token.append(done - have_token)
    return {"from_create": from_create, "from_token": from_token}


async def _start_agent(work: Path, tls, server_port: int) -> tuple:
    port, token_port = procs.free_port(), procs.free_port()
    log = open(work / "agent.log", "ab")  # noqa: ASYNC230 - once, at start-up
    files = tls.agent
    try:
        agent = await procs.spawn(
            [
                "-m", "agent", "--host", NODE_IP, "--port", str(port),
                "--token-endpoint", "--token-port", str(token_port),
                "--server-address", f"127.0.0.1:{server_port}",
                "--cert", str(files.cert), "--key", str(files.key), "--ca", str(files.ca),
                "--metadata-endpoint", "http://127.0.0.1:9", "--prometheus-listen-addr", "",
                "--log-level", "warning",
            ],
            core=procs.cpu(procs.SERVED_CPU), stdout=log.fileno(), stderr=log.fileno(),
        )  # fmt: skip
    finally:
        log.close()
    return agent, port, token_port


async def _until_all_200(requests, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    pending = list(requests)
    while pending and time.monotonic() < deadline:
        still = []
        for source, url, headers in pending:
            with contextlib.suppress(aiohttp.ClientError):
                connector = aiohttp.TCPConnector(local_addr=(source, 0))
                async with aiohttp.ClientSession(connector=connector) as one:
                    async with one.get(url, headers=headers) as response:
                        if response.status == 200:
                            continue
            still.append((source, url, headers))
        pending = still
        if pending:
            await asyncio.sleep(0.2)
    if pending:
        raise RuntimeError(f"{len(pending)} requests not answered with 200")


async def run(plane: ControlPlane, work: Path, options) -> list[dict]:
    sts = MotoSts()
    await asyncio.to_thread(sts.start)
    tls = make_tls_dirs(work / "tls")
    rows = []
    try:
        pods = await _pods(plane, options.pods)
        async with podiam_server(
            plane.admin_kubeconfig, sts, tls, extra=["--token-credentials"]
        ) as server:
            agent, port, token_port = await _start_agent(work, tls, server.server.port)
            try:
                metadata = [
                    (ip, f"http://{NODE_IP}:{port}{CREDENTIALS}{role}", {}) for ip, role, _ in pods
                ]
                tokens = [
                    (ip, f"http://{NODE_IP}:{token_port}{TOKEN_PATH}", {"Authorization": token})
                    for ip, _, token in pods
                ]
                await _until_all_200(metadata)
                await _until_all_200(tokens)
                targets = {
                    "metadata": (port, [[ip, CREDENTIALS + role, {}] for ip, role, _ in pods]),
                    "token": (
                        token_port,
                        [[ip, TOKEN_PATH, {"Authorization": token}] for ip, _, token in pods],
                    ),
                }
                for concurrency in options.concurrency:
                    best: dict[str, dict] = {}
                    for _ in range(options.repeat):
                        for route, (target_port, route_targets) in targets.items():
                            spec = {
                                "host": NODE_IP, "port": target_port, "targets": route_targets,
                                "requests": options.requests, "concurrency": concurrency,
                                "keepalive": True,
                            }  # fmt: skip
                            result = await procs.generate(
                                "bench.loadgen", spec, measured_pid=agent.pid
                            )
                            if route not in best or result["rps"] > best[route]["rps"]:
                                best[route] = result
                    rows.append({"concurrency": concurrency, **best})
                rows.append({"pod_start": await _pod_start(plane, token_port, options.starts)})
            finally:
                await procs.stop(agent)
    finally:
        await asyncio.to_thread(sts.stop)
    return rows


def _quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def _table(rows: list[dict], options) -> str:
    lines = [
        f"{options.pods} pods (one role, one identity), keep-alive, {options.requests} timed "
        f"requests per row, best of {options.repeat}; agent pinned to one core, load generator "
        "to the other.",
        "",
        "| conc. | metadata req/s | token req/s | ratio | metadata p50 / p99 ms "
        "| token p50 / p99 ms | agent CPU (md / tok) | non-200 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if "pod_start" in row:
            continue
        md, tok = row["metadata"], row["token"]
        bad = sum(v for r in (md, tok) for k, v in r["statuses"].items() if k != "200")
        bad += md["errors"] + tok["errors"]
        lines.append(
            f"| {row['concurrency']} | {md['rps']:.0f} | {tok['rps']:.0f} | "
            f"{tok['rps'] / md['rps']:.2f}x | {md['p50_ms']:.2f} / {md['p99_ms']:.2f} | "
            f"{tok['p50_ms']:.2f} / {tok['p99_ms']:.2f} | "
            f"{md['served_cpu']:.2f} / {tok['served_cpu']:.2f} | {bad} |"
        )
    starts = next((row["pod_start"] for row in rows if "pod_start" in row), None)
    if starts is not None:
        lines += [
            "",
            f"pod start → first credentials via /v1/credentials, {options.starts} pods one at "
            "a time (ms):",
            "",
            "| from | p50 | p90 | max |",
            "| --- | --- | --- | --- |",
        ]
        for label, key in (("pod created", "from_create"), ("token issued", "from_token")):
            values = sorted(starts[key])
            p50, p90 = (_quantile(values, q) * 1000 for q in (0.5, 0.9))
            lines.append(f"| {label} | {p50:.0f} | {p90:.0f} | {values[-1] * 1000:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.token_path", description=__doc__)
    parser.add_argument("--pods", type=int, default=50)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=lambda t: [int(x) for x in t.split(",")],
                        default=[1, 16, 64])  # fmt: skip
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--starts", type=int, default=20, help="pods for the pod-start figure")
    parser.add_argument("--json", type=Path, default=None)
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="podiam-token-bench-"))
    with running_control_plane(work / "controlplane") as plane:
        rows = asyncio.run(run(plane, work, options))
    print(_table(rows, options))
    if options.json is not None:
        options.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
