"""The README's first command must stay true: `make demo` runs `python -m demo`."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from tests.support.netns import requires_root


async def run_demo(**env: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "demo",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **env},
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), 180)
    return process.returncode, out.decode()


async def test_loopback_demo_shows_a_pod_served_and_a_pod_refused():
    code, out = await run_demo(PODIAM_DEMO="loopback")
    assert code == 0, out
    assert "assumed-role/app-web/podiam-web" in out
    assert "pod intruder (127.0.1.2): refused, HTTP 403" in out
    assert "finished: as expected" in out


@requires_root
@pytest.mark.timeout(240)
async def test_namespace_demo_intercepts_a_real_sdk_with_iptables():
    code, out = await run_demo()
    assert code == 0, out
    assert "DNAT rule on the worker node" in out
    assert "credentials from iam-role" in out
    assert "assumed-role/app-web/podiam-web" in out
    assert "no credentials (NoCredentialsError)" in out
    # The refused pod's reason, as the agent gave it (the SDK only says "no credentials").
    assert (
        "with HTTP 403: role 'admin' is not permitted by namespace 'shop' "
        "(iam.amazonaws.com/permitted='app-.*')" in out
    )


@requires_root
async def test_as_root_without_iptables_the_demo_says_to_install_it(tmp_path):
    # An empty PATH: neither ip nor iptables can be found, as on a machine without them.
    code, out = await run_demo(PATH=str(tmp_path))
    assert code == 0, out
    assert "ip and iptables not installed: running the loopback variant" in out
    assert "With iproute2 and iptables installed it shows the interception too." in out
    assert "As root" not in out
