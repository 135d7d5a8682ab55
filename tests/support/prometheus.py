"""Real Prometheus and promtool for the alert tests, built from their Go module by
tests/prometheus/build.sh (pinned in tests/prometheus/builder/go.mod, cached outside the work
tree), and a Prometheus process on loopback that scrapes given targets and evaluates a rule file.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support import gocache
from tests.support.controlplane import free_port
from tests.support.waiting import eventually

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "tests" / "prometheus" / "build.sh"
BINARIES = ("prometheus", "promtool")


def binaries_dir() -> Path:
    """Where the build script puts (or would put) the binaries; ``PODIAM_PROMETHEUS_BIN``
    overrides it."""
    return gocache.bin_dir(BUILD_SCRIPT, "PODIAM_PROMETHEUS_BIN")


def require_binaries() -> Path:
    """The binaries' directory; outside CI, skip when they are not built (under CI=true,
    fail)."""
    return gocache.require("Prometheus", BUILD_SCRIPT, binaries_dir(), BINARIES)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(require_binaries() / "promtool"), *args], capture_output=True, text=True, timeout=60
    )


@dataclass
class Prometheus:
    port: int
    log: Path

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}{query}"
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus {path}: {body}")
        return body["data"]

    def alerts(self, name: str) -> list[dict[str, Any]]:
        """The alerts of rule ``name`` now pending or firing (empty when inactive)."""
        return [a for a in self.api("alerts")["alerts"] if a["labels"].get("alertname") == name]

    def state(self, name: str) -> str:
        states = {alert["state"] for alert in self.alerts(name)}
        return "firing" if "firing" in states else states.pop() if states else "inactive"


@asynccontextmanager
async def running_prometheus(
    tmp: Path, *, targets: Sequence[tuple[str, int]], rules: str, interval: str = "1s"
) -> AsyncIterator[Prometheus]:
    """Prometheus scraping ``targets`` ((job, port) on 127.0.0.1) and evaluating ``rules``,
    both every ``interval``."""
    directory = require_binaries()
    (tmp / "rules.yml").write_text(rules)
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(tmp / "rules.yml")],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
            for job, port in targets
        ],
    }
    (tmp / "prometheus.yml").write_text(json.dumps(config))
    port = free_port()
    log = tmp / "prometheus.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            str(directory / "prometheus"),
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            stdout=out, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    prometheus = Prometheus(port, log)
    try:

        def up() -> bool:
            if process.returncode is not None:
                raise AssertionError(f"prometheus exited: {log.read_text()[-3000:]}")
            try:
                active = prometheus.api("targets")["activeTargets"]
            except OSError:
                return False
            return len(active) == len(targets) and all(t["health"] == "up" for t in active)

        await eventually(up, timeout=60, interval=0.2)
        yield prometheus
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()
        print(f"prometheus log: {log}", file=sys.stderr)
