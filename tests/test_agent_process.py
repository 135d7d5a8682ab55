"""podiam-agent as an operator runs it: --help, and start-up errors on one line."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.support.netns import Cluster, requires_root

AGENT = [sys.executable, "-m", "agent"]
# The console script pip installed beside this interpreter, as an operator runs it.
SCRIPT = str(Path(sys.executable).with_name("podiam-agent"))
REQUIRED = [
    "--host",
    "127.0.0.1",
    "--cert",
    "agent.pem",
    "--key",
    "agent-key.pem",
    "--ca",
    "ca.pem",
]


async def run_to_exit(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 30)
    return process.returncode, out.decode(), err.decode()


def one_line(stderr: str) -> str:
    """The one line a failure is reported in: progress lines logged at INFO before it (the host
    routes watched, say) may precede it, but nothing else — no traceback, no second error."""
    lines = [line for line in stderr.splitlines() if line.strip() and " INFO " not in line]
    assert len(lines) == 1, stderr
    return lines[0]


async def test_help_explains_every_flag_and_its_twin():
    code, out, _ = await run_to_exit(*AGENT, "--help")
    assert code == 0
    for text in ("--host", "HOST_IP", "--iptables", "NET_ADMIN", "--pod-wait", "cali+", "lxc+"):
        assert text in out


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--port", "abc"], {}, "argument --port: invalid port 'abc': expected a number 0-65535"),
        (["--pod-wait", "3x"], {}, "argument --pod-wait: invalid duration '3x'"),
        (["--host", "node-1"], {}, "--host 'node-1' is not an IP address"),
        (["--allow-route-regexp", "meta-data/hostname"], {}, "'meta-data/hostname' can never "
         "match: the pattern must match the whole path"),
        ([], {"PODIAM_IPTABLES": "maybe"}, "environment variable PODIAM_IPTABLES: expected true "
         "or false, got 'maybe'"),
        (["--no-such-flag"], {}, "unrecognized arguments: --no-such-flag"),
    ],
    ids=["port", "duration", "host", "route-regexp", "environment", "unknown"],
)  # fmt: skip
async def test_every_bad_flag_is_one_line_and_the_start_up_exit_code(args, env, expected):
    code, _, err = await run_to_exit(SCRIPT, *REQUIRED, *args, env=env)
    assert code == 1, err
    assert one_line(err).startswith("podiam-agent: error: ")
    assert expected in err


async def test_missing_host_is_named_on_one_line():
    code, _, err = await run_to_exit(SCRIPT, "--cert", "a", "--key", "k", "--ca", "c", env={})
    assert code == 1
    assert "the following arguments are required: --host" in one_line(err)


async def test_missing_certificate_is_one_clear_line(tls_dirs, tmp_path):
    missing = tmp_path / "agent.pem"
    files = tls_dirs.agent
    code, _, err = await run_to_exit(
        *AGENT, "--host", "127.0.0.1", "--port", "0", "--prometheus-listen-addr", "",
        "--cert", str(missing), "--key", str(files.key), "--ca", str(files.ca),
    )  # fmt: skip
    assert code == 1
    assert str(missing) in one_line(err)


async def test_a_server_only_certificate_as_client_certificate_is_one_clear_line(tls_dirs):
    server = tls_dirs.server  # serverAuth only: the server would refuse it as a client
    code, _, err = await run_to_exit(
        *AGENT, "--host", "127.0.0.1", "--port", "0", "--prometheus-listen-addr", "",
        "--cert", str(server.cert), "--key", str(server.key), "--ca", str(server.ca),
    )  # fmt: skip
    assert code == 1
    assert f"certificate {server.cert}: its extended key usage is serverAuth" in one_line(err)


async def test_port_in_use_is_one_clear_line(tls_dirs):
    files = tls_dirs.agent
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    try:
        code, _, err = await run_to_exit(
            *AGENT, "--host", "127.0.0.1", "--port", str(port), "--prometheus-listen-addr", "",
            "--cert", str(files.cert), "--key", str(files.key), "--ca", str(files.ca),
        )  # fmt: skip
    finally:
        blocker.close()
    assert code == 1
    assert f"127.0.0.1:{port}" in one_line(err)


@requires_root
async def test_iptables_without_net_admin_is_one_clear_line(tls_dirs):
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("setpriv (util-linux) is needed to drop NET_ADMIN")
    files = tls_dirs.agent
    # Inside a node namespace of its own, so nothing could touch this machine's rules.
    async with Cluster(prefix="agentcap") as cluster:
        node = cluster.node("n")
        result = await node.arun(
            setpriv, "--inh-caps", "-net_admin", "--bounding-set", "-net_admin", "--",
            *AGENT, "--iptables", "--host", node.ip, "--port", "0",
            "--prometheus-listen-addr", "",
            "--cert", str(files.cert), "--key", str(files.key), "--ca", str(files.ca),
            check=False, timeout=30,
        )  # fmt: skip
    assert result.returncode == 1
    assert "NET_ADMIN" in one_line(result.stderr)


@requires_root
async def test_iptables_without_conntrack_is_one_clear_line(tls_dirs):
    files = tls_dirs.agent
    async with Cluster(prefix="agentct") as cluster:
        node = cluster.node("n")
        result = await node.arun(
            *AGENT, "--iptables", "--host", node.ip, "--port", "8181",
            "--conntrack", "/nonexistent/conntrack", "--prometheus-listen-addr", "",
            "--cert", str(files.cert), "--key", str(files.key), "--ca", str(files.ca),
            check=False, timeout=30,
        )  # fmt: skip
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert "conntrack not found" in line and "--iptables" in line


async def test_cleanup_help_says_what_uninstalling_means():
    code, out, _ = await run_to_exit(*AGENT, "cleanup", "--help")
    assert code == 0
    for text in ("169.254.169.254", "real metadata", "IAM role", "NET_ADMIN", "--port"):
        assert text in out
    code, out, _ = await run_to_exit(*AGENT, "--help")
    assert "podiam-agent cleanup" in out


@requires_root
async def test_cleanup_with_nothing_to_remove_succeeds_and_says_so():
    async with Cluster(prefix="agentclean") as cluster:
        node = cluster.node("n")
        result = await node.arun(*AGENT, "cleanup", check=False, timeout=30)
    assert (result.returncode, result.stderr) == (0, "")
    assert "nothing to do" in result.stdout
