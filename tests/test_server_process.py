"""podiam-server as an operator runs it: a process with flags, start-up errors on one line,
Prometheus metrics, and a graceful exit on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from server.arn import ArnError, detect_base_arn
from tests.support.kubeapi import KubeApiServer
from tests.support.pods import add_pod
from tests.support.server import server_argv
from tests.support.waiting import eventually

PYTHON = [sys.executable, "-m", "server"]
# The console script pip installed beside this interpreter, as an operator runs it.
SCRIPT = str(Path(sys.executable).with_name("podiam-server"))
# The server's own AWS identity: moto's fake keys, never whatever this machine has.
ENV = {
    **os.environ,
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def run_to_exit(*args: str, command: list[str] = PYTHON, **env: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *command, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**ENV, **env},
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    return process.returncode, stderr.decode()


@pytest.fixture(scope="module")
def namespaces():
    return {"apps": ".*"}


@pytest.fixture(scope="module")
def kubeconfig(kube, tmp_path_factory) -> Path:
    add_pod(kube, "apps", "web", "web", ip="10.3.0.1")
    path = tmp_path_factory.mktemp("kube") / "config"
    kube.write_kubeconfig(str(path))
    return path


@pytest.fixture
def argv(kubeconfig, moto_sts, tls_dirs) -> list[str]:
    return server_argv(kubeconfig=kubeconfig, sts=moto_sts, tls=tls_dirs)


def replace_flag(argv: list[str], flag: str, value: str) -> list[str]:
    index = argv.index(flag)
    return [*argv[: index + 1], value, *argv[index + 2 :]]


async def metrics_contain(fetch, text: str) -> bool:
    return text in await fetch()


def assert_one_line_error(code: int, stderr: str, *words: str) -> None:
    assert code == 1, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    for word in words:
        assert word in lines[0]


async def test_help_explains_flags_and_their_environment_twins():
    code, _ = await run_to_exit("--help")
    assert code == 0
    process = await asyncio.create_subprocess_exec(
        *PYTHON, "--help", stdout=asyncio.subprocess.PIPE
    )
    out = (await process.communicate())[0].decode()
    for text in ("--session-refresh", "PODIAM_SESSION_REFRESH", "--no-node-binding", "30m"):
        assert text in out


async def test_missing_certificate_is_one_clear_line(argv, tmp_path):
    missing = str(tmp_path / "nope.pem")
    code, stderr = await run_to_exit(*replace_flag(argv, "--cert", missing))
    assert_one_line_error(code, stderr, missing, "no such file")


async def test_a_client_only_certificate_as_server_certificate_is_one_clear_line(argv, tls_dirs):
    agent = tls_dirs.agent  # clientAuth only: agents could never complete a handshake
    args = replace_flag(replace_flag(argv, "--cert", str(agent.cert)), "--key", str(agent.key))
    code, stderr = await run_to_exit(*args)
    assert_one_line_error(code, stderr, str(agent.cert), "not serverAuth")


async def test_unreadable_kubeconfig_is_one_clear_line(argv, tmp_path):
    garbage = tmp_path / "kubeconfig"
    garbage.write_text("{{{ not yaml")
    code, stderr = await run_to_exit(*replace_flag(argv, "--kubeconfig", str(garbage)))
    assert_one_line_error(code, stderr, str(garbage))


async def test_unreachable_kubernetes_api_is_one_clear_line(argv, tmp_path):
    closed = KubeApiServer(port=free_port())
    closed.url = f"http://127.0.0.1:{closed.port}"
    path = tmp_path / "kubeconfig"
    closed.write_kubeconfig(str(path))
    code, stderr = await run_to_exit(*replace_flag(argv, "--kubeconfig", str(path)))
    assert_one_line_error(code, stderr, "unreachable")


@pytest.mark.parametrize(
    ("change", "env", "expected"),
    [
        (("--role-base-arn", "arn:aws:s3:::b"), {}, "error: --role-base-arn: role base ARN "
         "'arn:aws:s3:::b' is not of the form arn:aws:iam::123456789012:role/"),
        (("--session-duration", "3x"), {}, "error: argument --session-duration: invalid "
         "duration '3x': use forms like 90s, 15m, 1h or 1h30m"),
        (("--session-duration", "13h"), {}, "--session-duration must lie between 15m and 12h"),
        (("--bind", "localhost"), {}, "invalid address 'localhost': expected host:port"),
        ((), {"PODIAM_SESSION_REFRESH": "soon"}, "environment variable PODIAM_SESSION_REFRESH: "
         "invalid duration 'soon'"),
        (("--no-such-flag",), {}, "error: unrecognized arguments: --no-such-flag"),
        (("--cert",), {}, "error: argument --cert: expected one argument"),
    ],
    ids=["arn", "duration", "duration-range", "address", "environment", "unknown", "missing"],
)  # fmt: skip
async def test_every_bad_flag_is_one_line_and_the_start_up_exit_code(argv, change, env, expected):
    if change and change[0] in argv and len(change) == 2:
        args = replace_flag(argv, *change)
    else:
        args = [*argv, *change]
    code, stderr = await run_to_exit(*args, command=[SCRIPT], **env)
    assert_one_line_error(code, stderr, "podiam-server: error: ", expected)
    assert stderr.startswith("podiam-server: error: ")


async def test_missing_required_flags_are_named_on_one_line():
    code, stderr = await run_to_exit(command=[SCRIPT])
    assert_one_line_error(code, stderr, "required: --cert, --key, --ca")


async def test_sigterm_drains_and_exits_cleanly_with_metrics_served_until_then(argv):
    metrics_port = free_port()
    args = replace_flag(argv, "--prometheus-listen-addr", f"127.0.0.1:{metrics_port}")
    process = await asyncio.create_subprocess_exec(
        *PYTHON, *args, "--json-log", stderr=asyncio.subprocess.PIPE, env=ENV
    )
    try:
        lines = []
        while True:
            line = await asyncio.wait_for(process.stderr.readline(), 30)
            assert line, "server exited early: " + "".join(lines)
            lines.append(line.decode())
            if "serving gRPC" in line.decode():
                break
        entry = json.loads(lines[-1])
        assert entry["level"] == "info" and entry["message"].startswith("serving gRPC")

        async def metrics() -> str:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as response:
                    return await response.text()

        text = await metrics()
        assert "podiam_pods_indexed 1.0" in text
        assert "podiam_namespaces_indexed 1.0" in text
        # The pod's credentials are fetched as soon as it is seen, before anyone asks.
        prefetched = 'podiam_sts_assume_role_total{outcome="success"} 1.0'
        await eventually(lambda: metrics_contain(metrics, prefetched))

        process.send_signal(signal.SIGTERM)
        rest = (await asyncio.wait_for(process.stderr.read(), 30)).decode()
        assert await process.wait() == 0
        assert "shutting down" in rest
        for line in rest.splitlines():
            json.loads(line)  # every line is JSON
        assert "SecretAccessKey" not in rest and "testing" not in "".join(lines) + rest
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# ---- base ARN autodetection ------------------------------------------------------------------


@pytest_asyncio.fixture
async def instance_profile_metadata():
    """The two metadata paths autodetection reads, as EC2's IMDS answers them (IMDSv2)."""
    token = "imds-token"

    async def put_token(request: web.Request) -> web.Response:
        return web.Response(text=token)

    async def iam_info(request: web.Request) -> web.Response:
        if request.headers.get("X-aws-ec2-metadata-token") != token:
            return web.Response(status=401)
        return web.json_response(
            {
                "Code": "Success",
                "LastUpdated": "2026-11-22T06:00:00Z",
                "InstanceProfileArn": "arn:aws:iam::210987654321:instance-profile/podiam-servers",
                "InstanceProfileId": "AIPAEXAMPLE",
            }
        )

    app = web.Application()
    app.router.add_put("/latest/api/token", put_token)
    app.router.add_get("/latest/meta-data/iam/info", iam_info)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def test_base_arn_is_detected_from_the_instance_profile(instance_profile_metadata):
    assert await detect_base_arn(instance_profile_metadata) == "arn:aws:iam::210987654321:role/"


async def test_base_arn_detection_failure_says_why(moto_sts):
    # moto's metadata service has no iam/info: a real service without an instance profile.
    with pytest.raises(ArnError, match="iam/info"):
        await detect_base_arn(moto_sts.endpoint_url)


async def test_autodetect_failure_stops_start_up_with_one_line(argv):
    index = argv.index("--role-base-arn")
    args = [*argv[:index], *argv[index + 2 :], "--role-base-arn-autodetect"]
    args += ["--metadata-endpoint", f"http://127.0.0.1:{free_port()}"]
    code, stderr = await run_to_exit(*args)
    assert_one_line_error(code, stderr, "autodetect", "instance profile")
