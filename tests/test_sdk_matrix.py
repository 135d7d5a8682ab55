"""Every major AWS SDK in a pod gets the pod's own credentials through podiam, and nothing else.

Each SDK reads the metadata service its own way (timeouts, retries, IMDSv2 tokens, paths,
header casing, connection reuse, when it refreshes), and a kiam-class tool is only as good as
the SDK it serves worst. So the same small program — the SDK's *default* credential chain, then
STS GetCallerIdentity, one JSON line per call — is written once per SDK under tests/clients/
and run here inside pods behind the real DNAT rule, against the test STS (moto), in three
modes:

- ``imdsv1-allowed``: the agent's default; SDKs may use tokens or not.
- ``imdsv2-only``: an agent started with ``--require-imdsv2``.
- ``not-permitted``: a pod whose role its namespace does not permit; the SDK must end with no
  credentials at all, never the node's (moto's own instance credentials, key ``test-key``).

Then a refresh check: the test STS hands out sessions that expire within seconds for the
``app-refresh-`` roles, so an SDK's cached credentials reach the end of their life while the
program calls STS once a second; every call must succeed, and the SDK must have fetched new
credentials through the agent along the way. The agent is restarted before the first refresh,
as in a DaemonSet rollout, which invalidates every IMDSv2 token the SDKs hold.

The compiled clients are built by ``tests/clients/build.sh`` (``.ci/run`` runs it first) into a
cache outside the work tree. Outside CI a client whose build or toolchain is missing is skipped;
under CI=true it fails. The results are printed as one table at the end of the run.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import pytest_asyncio

from tests.support.e2e import BASE_ARN, REPO, PodiamCluster, PodiamPod
from tests.support.netns import requires_root

pytestmark = requires_root

CLIENTS_DIR = REPO / "tests" / "clients"
BUILD = CLIENTS_DIR / "build.sh"
NODE_ACCESS_KEY = "test-key"  # what moto's metadata service hands out as the node's credentials
ACCOUNT = "123456789012"
V2_ONLY_WORKER = 1  # the worker whose agent runs with --require-imdsv2
REFRESH_WORKER = 2  # the refresh runs' worker, whose agent is restarted during them
# Short sessions from the test STS: longer than the server's minimum refresh interval (1 min),
# so the server always has fresh credentials before the old ones expire, as with real STS.
REFRESH_LIFETIME = 75
REFRESH_SECONDS = 100  # each refresh run outlives its first credentials by ~25 s
# Before the first refresh: the agent's restart invalidates the IMDSv2 tokens the SDKs hold
# (its token key lives in memory), so each SDK's refresh starts with a 401 it must recover from.
RESTART_AFTER = 20
RUN_TIMEOUT = 90.0


@dataclass(frozen=True)
class Client:
    """One SDK's whoami program: ``language`` is its build.sh name (None: nothing to build)."""

    name: str
    language: str | None
    tool: str  # what must be on PATH to run it

    def argv(self, built: Path | None, seconds: int = 0) -> list[str]:
        loop = [str(seconds)] if seconds else []
        match self.name:
            case "go-v2" | "rust":
                assert built is not None
                return [str(built / "whoami"), *loop]
            case "java-2.x":
                assert built is not None
                classpath = f"{built / 'classes'}:{built / 'lib'}/*"
                return [self.tool, "-cp", classpath, "podiam.WhoAmI", *loop]
            case "js-v3":
                assert built is not None
                return [self.tool, str(built / "whoami.mjs"), *loop]
            case "boto3":
                return [self.tool, str(CLIENTS_DIR / "python" / "whoami.py"), *loop]
            case "aws-cli":
                assert not loop, "the AWS CLI makes one call"
                return [self.tool, "sts", "get-caller-identity", "--output", "json"]
        raise AssertionError(self.name)


AWS_CLI = str(Path(sys.executable).with_name("aws"))
CLIENTS = [
    Client("go-v2", "go", "go"),
    Client("java-2.x", "java", "java"),
    Client("rust", "rust", "cargo"),
    Client("js-v3", "js", "node"),
    Client("boto3", None, sys.executable),
    Client("aws-cli", None, AWS_CLI),
]
# Not boto3: botocore extends IMDS credentials with less than 12-20 minutes left to 12-20
# minutes from now ("static stability"), so short test sessions are used past their expiry by
# design. podiam's server never hands out credentials with under 30 minutes left, which keeps
# botocore off that path (tests/test_credentials_cache.py). Not the AWS CLI: one call per run.
REFRESHING = [c for c in CLIENTS if c.name not in ("boto3", "aws-cli")]
MODES = ["imdsv1-allowed", "imdsv2-only", "not-permitted"]

# (client, mode) -> what the table shows; filled in by the tests.
RESULTS: dict[tuple[str, str], str] = {}
_OUTCOME = pytest.StashKey[str]()  # "FAIL" or "skipped"; unset: passed so far


@cache
def build_dir(language: str) -> Path | None:
    """Where build.sh puts ``language``'s build for the current sources (None: it cannot say,
    e.g. without the toolchain, whose version is part of the key)."""
    where = subprocess.run([str(BUILD), "--where", language], capture_output=True, text=True)
    out = where.stdout.strip()
    return Path(out) if where.returncode == 0 and out else None


def unavailable(client: Client) -> str | None:
    """Why the client cannot run here, or None."""
    if shutil.which(client.tool) is None and not Path(client.tool).exists():
        return f"{client.tool} not found"
    if client.language is None:
        return None
    if shutil.which("sha256sum") is None:
        return "sha256sum not found"
    where = build_dir(client.language)
    if where is None or not where.is_dir():
        return f"{client.name} is not built: run {BUILD.relative_to(REPO)} {client.language}"
    return None


def built(client: Client) -> Path | None:
    """The client's build directory; skips (fails under CI=true) when it cannot run here."""
    problem = unavailable(client)
    if problem is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {problem}", pytrace=False)
        pytest.skip(problem)
    return build_dir(client.language) if client.language else None


# ---------------------------------------------------------------- the cluster and the table


@pytest_asyncio.fixture(scope="module")
async def podiam(request: pytest.FixtureRequest) -> AsyncIterator[PodiamCluster]:
    request.config.pluginmanager.register(_Table(), "podiam-sdk-matrix-table")
    cluster = PodiamCluster(
        workers=3,
        permitted={"apps": "app-.*"},
        worker_args={V2_ONLY_WORKER: ["--require-imdsv2"]},
    )
    async with cluster:
        assert cluster.sts is not None
        cluster.sts.shorten_sessions(BASE_ARN + "app-refresh-", REFRESH_LIFETIME)
        yield cluster


class _Table:
    """Notes which tests failed, and prints the matrix after the run whatever ``-q`` or capture
    settings are in use (a plugin registered by the cluster fixture: test modules cannot
    implement hooks)."""

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item):
        report = yield
        if report.failed:
            item.stash[_OUTCOME] = "FAIL"
        elif report.skipped and item.stash.get(_OUTCOME, None) is None:
            item.stash[_OUTCOME] = "skipped"
        return report

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not RESULTS:
            return
        columns = [*MODES, "refresh"]
        names = [c.name for c in CLIENTS]
        width = max(len(n) for n in names) + 2
        cell = max(len(m) for m in columns) + 2
        terminalreporter.section("AWS SDK client matrix (tests/test_sdk_matrix.py)")
        terminalreporter.write_line("client".ljust(width) + "".join(c.ljust(cell) for c in columns))
        for name in names:
            refreshes = any(c.name == name for c in REFRESHING)
            row = [
                RESULTS.get((name, mode), "-" if refreshes or mode != "refresh" else "n/a")
                for mode in columns
            ]
            terminalreporter.write_line(name.ljust(width) + "".join(r.ljust(cell) for r in row))


def pod_env(podiam: PodiamCluster) -> dict[str, str]:
    """What every client gets on top of ``pod_env()``: the region and the STS endpoint (moto).
    The metadata endpoint is left alone: the default 169.254.169.254, caught by the DNAT rule."""
    return {
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_STS": podiam.sts_url,
        # The AWS CLI pages and colours output for a terminal; nothing else differs.
        "AWS_PAGER": "",
    }


def lines_of(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


async def run_in_pod(
    podiam: PodiamCluster, pod: PodiamPod, client: Client, seconds: int = 0
) -> subprocess.CompletedProcess[str]:
    argv = client.argv(built(client), seconds)
    return await pod.run(*argv, env=pod_env(podiam), timeout=RUN_TIMEOUT + seconds)


@dataclass
class RefreshRun:
    pod: PodiamPod
    role: str
    task: asyncio.Task[subprocess.CompletedProcess[str]]


@pytest_asyncio.fixture(scope="module")
async def refresh_runs(podiam: PodiamCluster) -> AsyncIterator[dict[str, RefreshRun]]:
    """Every refresh run, started at once on their own worker: they take REFRESH_SECONDS each,
    so they share that time with each other and with the matrix (whose tests ask for this
    fixture too). Their agent is restarted RESTART_AFTER seconds in, as in a DaemonSet rollout."""
    runs = {}
    for client in REFRESHING:
        if unavailable(client) is not None:
            continue  # the test itself skips or fails
        slug = client.name.replace(".", "")
        role = f"app-refresh-{slug}"
        pod = podiam.add_pod(REFRESH_WORKER, "apps", f"{slug}-refresh", role)
        task = asyncio.create_task(run_in_pod(podiam, pod, client, REFRESH_SECONDS))
        runs[client.name] = RefreshRun(pod, role, task)
    restart = asyncio.create_task(restart_agent(podiam, REFRESH_WORKER, RESTART_AFTER))
    yield runs
    tasks = [restart, *(run.task for run in runs.values())]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def restart_agent(podiam: PodiamCluster, worker: int, after: float) -> None:
    await asyncio.sleep(after)
    agent = podiam.agent(worker)
    assert await agent.stop() == 0, agent.log()
    await agent.start()


def assumed_role(role: str) -> str:
    return f"arn:aws:sts::{ACCOUNT}:assumed-role/{role}/"


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Iterator[list[str]]:
    """Where a test puts its table cell's key; the cell shows the test's outcome."""
    key: list[str] = []
    yield key
    if key:
        RESULTS[(key[0], key[1])] = request.node.stash.get(_OUTCOME, "ok")


# ---------------------------------------------------------------- the matrix


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("client", CLIENTS, ids=lambda c: c.name)
async def test_sdk_default_chain_in_a_pod_gets_only_its_own_role(
    podiam: PodiamCluster,
    refresh_runs: dict[str, RefreshRun],
    client: Client,
    mode: str,
    record: list[str],
) -> None:
    record += [client.name, mode]
    slug = client.name.replace(".", "")
    worker = V2_ONLY_WORKER if mode == "imdsv2-only" else 0
    role = "admin" if mode == "not-permitted" else f"app-{slug}-{mode[:6]}"
    pod = podiam.add_pod(worker, "apps", f"{slug}-{mode[:6]}", role)
    result = await run_in_pod(podiam, pod, client)
    said = result.stdout + result.stderr
    assert NODE_ACCESS_KEY not in said, "the node's credentials reached a pod"

    if mode == "not-permitted":
        assert result.returncode != 0, said
        lines = lines_of(result.stdout)
        assert all("access_key_id" not in line and "arn" not in line for line in lines), said
        # The SDK did ask the agent, and was refused.
        assert await podiam.agent(worker).logged(f"from {pod.ip} refused"), said + podiam.logs()
        return

    assert result.returncode == 0, said + podiam.logs()
    if client.name == "aws-cli":
        arn = json.loads(result.stdout)["Arn"]
    else:
        [line] = lines_of(result.stdout)
        assert line["access_key_id_prefix"] == "ASIA", line  # temporary (STS) credentials
        arn = line["arn"]
    assert arn.startswith(assumed_role(role)), said


@pytest.mark.parametrize("client", REFRESHING, ids=lambda c: c.name)
async def test_sdk_refreshes_expiring_credentials_through_the_agent_without_a_failed_call(
    podiam: PodiamCluster,
    refresh_runs: dict[str, RefreshRun],
    client: Client,
    record: list[str],
) -> None:
    record += [client.name, "refresh"]
    built(client)
    run = refresh_runs[client.name]
    role = run.role
    result = await run.task
    said = result.stdout + result.stderr
    lines = lines_of(result.stdout)
    failed = [line for line in lines if "error" in line]
    assert failed == [], said + podiam.logs()
    assert result.returncode == 0, said
    assert len(lines) >= REFRESH_SECONDS // 2, said  # it really kept calling
    assert all(line["arn"].startswith(assumed_role(role)) for line in lines), said
    # Credentials that expire after REFRESH_LIFETIME seconds were replaced along the way.
    keys = list(dict.fromkeys(line["access_key_id"] for line in lines))
    assert len(keys) >= 2, said
