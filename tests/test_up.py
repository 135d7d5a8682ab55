"""`make up` keeps a local stack running: what it prints works — the curl, both metrics URLs,
the locust command — and SIGTERM takes everything down."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.support.netns import requires_root

REPO = Path(__file__).resolve().parents[1]
LABEL = re.compile(r"^(agent|agent metrics|server metrics|pids|curl|locust): (.*)$")


def test_make_up_installs_the_bench_extras_and_runs_the_stack():
    # -n -B: what `make up` would run from nothing, without running it.
    dry = subprocess.run(
        ["make", "--no-print-directory", "-n", "-B", "up"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "'.[test,bench]'" in dry
    assert dry.strip().splitlines()[-1].endswith("python -m demo.up")


async def read_report(process: asyncio.subprocess.Process) -> dict[str, str]:
    """The ``label: value`` lines `make up` prints, up to the line saying how to stop it."""
    found: dict[str, str] = {}
    seen = []
    while True:
        line = (await process.stdout.readline()).decode()
        assert line, "make up ended before it was up:\n" + "".join(seen)
        seen.append(line)
        if line.startswith("Ctrl-C"):
            return found
        if match := LABEL.match(line.rstrip("\n")):
            found[match[1]] = match[2]


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(180)
@pytest.mark.parametrize("variant", ["loopback", pytest.param("namespaces", marks=requires_root)])
async def test_the_local_stack_serves_curl_metrics_and_a_headless_locust_run(tmp_path, variant):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PODIAM_DEMO": variant}
    with (tmp_path / "logs").open("wb") as logs:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "demo.up", cwd=REPO, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=logs,
        )  # fmt: skip
    try:
        report = await asyncio.wait_for(read_report(process), 90)
        assert report.keys() == {
            "agent",
            "agent metrics",
            "server metrics",
            "pids",
            "curl",
            "locust",
        }

        # The curl it prints, as printed: a pod's credentials.
        if shutil.which("curl"):
            curl = await asyncio.create_subprocess_exec(
                *shlex.split(report["curl"]), "--silent", "--fail",
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, _ = await asyncio.wait_for(curl.communicate(), 30)
            assert curl.returncode == 0
            assert json.loads(out)["Code"] == "Success"

        # The locust command it prints, shortened to a few seconds with five users.
        words = shlex.split(report["locust"])
        assignments = [w for w in words if re.match(r"^[A-Z_]+=", w)]
        argv = words[len(assignments) :]
        assert any(w.endswith("/locust") for w in argv) and "bench/locustfile.py" in argv
        locust = await asyncio.create_subprocess_exec(
            *argv, "-u", "5", "-r", "5", "-t", "5s", "--only-summary", "--json",
            cwd=REPO, env={**env, **dict(a.split("=", 1) for a in assignments)},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(locust.communicate(), 60)
        assert locust.returncode == 0, err.decode()[-3000:]
        stats = json.loads(out)
        by_name = {entry["name"]: entry for entry in stats}
        assert {"token", "role", "credentials"} <= by_name.keys(), stats
        assert all(entry["num_requests"] > 0 for entry in by_name.values())
        assert sum(entry["num_failures"] for entry in stats) == 0

        # Both programs' metrics, each its own: the agent counted locust's requests.
        async with aiohttp.ClientSession() as http:
            async with http.get(report["agent metrics"]) as response:
                agent_metrics = await response.text()
            async with http.get(report["server metrics"]) as response:
                server_metrics = await response.text()
        assert 'podiam_agent_requests_total{route="credentials",status="200"}' in agent_metrics
        assert "podiam_server_" not in agent_metrics
        assert re.search(r"^podiam_pods_indexed [1-9]", server_metrics, re.MULTILINE)
        assert "podiam_agent_" not in server_metrics

        pids = [int(pid) for pid in re.findall(r"\d+", report["pids"])]
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 60) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert not [pid for pid in pids if process_exists(pid)]
    if variant == "loopback":
        # (The namespace variant's logs go to files that it removes.)
        log = (tmp_path / "logs").read_text()
        assert "podiam.agent: shutting down" in log and "podiam.server: shutting down" in log
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.ClientConnectionError):
                await http.get(report["agent"] + "/ping")
    else:
        # Its addresses may belong to another run's namespaces by now; its own must be gone.
        pod = shlex.split(report["curl"])[3]  # ip netns exec <pod> curl …
        listed = await asyncio.create_subprocess_exec(
            "ip", "netns", "list", stdout=asyncio.subprocess.PIPE
        )
        assert pod.encode() not in (await listed.communicate())[0]
