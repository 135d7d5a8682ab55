"""The benchmark runs and reports what it should: its quickest sections at tiny sizes, checked
for the report's structure — never for the figures, which depend on the machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from bench.__main__ import FAULTS, SECTIONS, parse_options
from bench.plots import write_plots

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def test_quick_defaults_and_overrides_are_parsed():
    options = parse_options(["--quick", "--sections", "hot,sts", "--concurrency", "2,8"])
    assert options.sections == ["hot", "sts"]
    assert options.concurrency == [2, 8]
    assert options.keepalive == [True, False]
    assert set(SECTIONS) >= {"hot", "client", "podstart", "sts", "scale", "faults"}
    assert options.faults == list(FAULTS)
    assert options.sts_outage_minutes == 5


def test_faults_can_be_picked_and_an_unknown_one_is_refused(capsys):
    assert parse_options(["--faults", "kube, rollout"]).faults == ["kube", "rollout"]
    with pytest.raises(SystemExit):
        parse_options(["--faults", "kube,earthquake"])
    assert "unknown faults: earthquake" in capsys.readouterr().err


def test_tiny_run_writes_a_markdown_and_json_report(tmp_path):
    out, data = tmp_path / "report.md", tmp_path / "report.json"
    result = subprocess.run(
        [
            sys.executable, "-m", "bench", "--quick",
            "--sections", "hot,podstart,sts",
            "--pods", "12", "--roles", "2", "--requests", "60", "--concurrency", "1,4",
            "--routes", "credentials", "--repeat", "1",
            "--flood-connections", "100", "--victim-requests", "50",
            "--start-pods", "4", "--sts-pods", "12", "--sts-roles", "2",
            "--out", str(out), "--json", str(data),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    markdown = out.read_text()
    assert markdown in result.stdout
    for heading in ("# podiam benchmark report", "## Targets", "## Agent hot path",
                    "## Pod start", "## STS economy"):  # fmt: skip
        assert heading in markdown

    report = json.loads(data.read_text())
    sections = {section["key"]: section for section in report["sections"]}
    assert list(sections) == ["hot", "podstart", "sts"]
    hot = sections["hot"]["tables"][0]
    assert {"agent req/s", "aiohttp req/s", "raw req/s", "vs aiohttp", "vs raw", "agent p99",
            "aiohttp p99", "CPU s/100k"} <= set(hot["columns"])  # fmt: skip
    # credentials only, keep-alive and not, two concurrencies
    assert len(hot["rows"]) == 4
    for row in sections["hot"]["data"]["rows"]:
        assert (
            row["agent"]["requests"] == row["aiohttp"]["requests"] == row["raw"]["requests"] == 60
        )
        assert row["agent"]["errors"] == row["aiohttp"]["errors"] == row["raw"]["errors"] == 0
    flood = sections["hot"]["data"]["flood"]
    assert flood["alone"]["requests"] == flood["during"]["requests"] == 50
    assert set(sections["hot"]["data"]["rss_mb"]) == {"idle", "load_peak", "flood_peak"}
    # Every target the sections measure is judged (ok or missed), none left unmeasured.
    names = [check["name"] for check in report["checks"]]
    assert any("keep-alive" in name for name in names)
    assert any("pod start" in name for name in names)
    assert any("AssumeRole" in name for name in names)
    verdicts_follow_the_figures(sections)
    for check in report["checks"]:
        assert check["target"] and check["measured"], check
        assert isinstance(check["ok"], bool), check  # measured here, so judged
        verdict = "ok" if check["ok"] else "MISSED"
        assert f"| {check['name']} | {check['target']} | {check['measured']} | {verdict} |" in (
            markdown
        )
    # The STS economy counts are exact, whatever the machine: M per refresh, not N.
    sts = sections["sts"]["data"]
    assert sts["hour"]["rounds"] == [2, 2, 2]
    assert sts["burst"]["calls"] == 2
    assert all(check["ok"] for check in sections["sts"]["checks"])
    # Minute by minute, the hour's calls add up to its total: 2 at the start, 2 per refresh.
    per_minute = sts["hour"]["calls_per_minute"]
    assert len(per_minute) == 61 and sum(per_minute) == sts["hour"]["total"]
    assert per_minute[0] == 2 and sorted(set(per_minute)) == [0, 2]
    # Pictures beside the Markdown, linked from it.
    for name in ("report-latency.png", "report-assume-role-hour.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG, name
        assert f"]({name})" in markdown


def verdicts_follow_the_figures(sections: dict) -> None:
    """Each machine-dependent verdict is the comparison of the figure the report shows with
    its target: a verdict can be either, but not one the figures contradict."""
    checks = {check["name"]: check for s in sections.values() for check in s["checks"]}
    rows = sections["hot"]["data"]["rows"]
    for keepalive, label in ((True, "keep-alive"), (False, "no keep-alive")):
        measured = [r for r in rows if r["route"] == "credentials" and r["keepalive"] is keepalive]
        worst = min(r["vs_aiohttp"] for r in measured)
        throughput = checks[
            f"agent credentials, {label}: req/s vs bare aiohttp (worst concurrency)"
        ]
        assert (throughput["measured"], throughput["ok"]) == (f"{worst:.2f}x", worst >= 3.0)
        worst_raw = min(r["vs_raw"] for r in measured)
        raw = checks[
            f"agent credentials, {label}: req/s vs raw httptools+uvloop (worst concurrency)"
        ]
        assert (raw["measured"], raw["ok"]) == (f"{worst_raw:.2f}x", worst_raw >= 0.5)
        worst_p99 = max(r["p99_ratio"] for r in measured)
        p99 = checks[f"agent credentials, {label}: p99 vs bare aiohttp (worst concurrency)"]
        assert (p99["measured"], p99["ok"]) == (f"{worst_p99:.2f}x", worst_p99 <= 1.0)
    busiest = max(r[side]["generator_cpu"] for r in rows for side in ("agent", "aiohttp", "raw"))
    generator = checks["load generator is not the bottleneck: its busiest row's CPU"]
    assert generator["ok"] == (busiest < 0.8)
    for label, row in sections["podstart"]["data"]["rows"].items():
        start = checks[f"pod start p99, {label}"]
        assert start["ok"] == (row["p99_ms"] < 100 and not row["failures"])


def test_sts_economy_figures_for_workloads_and_the_rate_budget_are_exact_counts(tmp_path):
    data = tmp_path / "report.json"
    result = subprocess.run(
        [
            sys.executable, "-m", "bench", "--quick", "--sections", "sts",
            "--sts-pods", "12", "--sts-roles", "2", "--sts-workloads", "4",
            "--sts-burst-pods", "20", "--sts-flood", "30", "--sts-flood-held", "5",
            "--sts-throttle-seconds", "1",
            "--out", str(tmp_path / "report.md"), "--json", str(data),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (sts,) = [s["data"] for s in json.loads(data.read_text())["sections"] if s["key"] == "sts"]
    # One AssumeRole per Deployment per refresh round, and one for a new Deployment's burst.
    assert sts["workload_hour"]["rounds"] == [4, 4, 4]
    assert sts["workload_burst"]["calls"] == 1
    assert sts["workload_burst"]["ok"] == 20
    # The bucket's invariant holds, every identity was fetched, no holder of valid credentials
    # was refused, under the flood or under throttling.
    assert sts["flood"]["within_bucket"] is True
    assert sts["flood"]["calls"] == 30 + 5
    assert sts["flood"]["probe_refusals"] == 0 < sts["flood"]["probe_answers"]
    assert sts["throttle"]["probe_refusals"] == 0 < sts["throttle"]["probe_answers"]
    assert sts["throttle"]["throttled_answers"] > 0


def test_server_scale_plot_is_drawn_from_the_sections_rows(tmp_path):
    rows = [
        {"pods": 0, "sync_s": 0.1, "start_s": 1.0, "rss_mb": 60.0, "peak_rss_mb": 61.0},
        {"pods": 10000, "sync_s": 1.2, "start_s": 2.5, "rss_mb": 80.0, "peak_rss_mb": 90.0},
        {"pods": 50000, "sync_s": 5.1, "start_s": 6.8, "rss_mb": 150.0, "peak_rss_mb": 170.0},
    ]
    report = {"sections": [{"key": "scale", "skipped": "", "data": {"rows": rows}}]}
    drawn = write_plots(report, tmp_path, "r")
    assert [(title, path.name) for title, path in drawn] == [
        ("Server memory and initial sync vs pods", "r-server-scale.png")
    ]
    assert (tmp_path / "r-server-scale.png").read_bytes()[:8] == PNG
    # A skipped section draws nothing.
    report["sections"][0]["skipped"] = "needs root"
    assert write_plots(report, tmp_path, "s") == []


def test_realscale_runs_only_when_named():
    # An hour at full size: a plain `python -m bench` must not start it.
    assert "realscale" in SECTIONS
    assert "realscale" not in parse_options([]).sections
    assert parse_options(["--sections", "realscale", "--quick"]).real_scale == "20x5"


@pytest.mark.timeout(300)
def test_realscale_compares_the_real_api_with_the_double_at_the_same_pods(tmp_path):
    from tests.support.controlplane import require_binaries

    require_binaries()
    out, data = tmp_path / "report.md", tmp_path / "report.json"
    result = subprocess.run(
        [
            sys.executable, "-m", "bench", "--sections", "realscale",
            "--real-scale", "4x3", "--watch-events", "5",
            "--out", str(out), "--json", str(data),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    section = json.loads(data.read_text())["sections"][0]
    assert section["key"] == "realscale" and not section["skipped"]
    rows = section["data"]["rows"]
    assert [row["api"] for row in rows] == ["double", "real"]
    for row in rows:
        # Every node's stream opened, the snapshots held every pod, the new pods reached them.
        assert row["streams"] == row["node_streams_metric"] == 4
        assert row["snapshot_pods"] == 12
        assert row["delivered_pods"] == 5


async def test_kubeproc_rollout_replaces_pods_through_their_lifecycles_in_waves(tmp_path):
    """bench/kubeproc.py ``rollout``: the pods added first replaced by new ones, wave by wave,
    each pod through its lifecycle's events, as a pod watch with podiam's selector sees them."""
    import asyncio

    import aiohttp

    from server.pods import UNFINISHED_PODS
    from tests.support.kubeapi import DEFAULT_TOKEN

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.kubeproc", "--pods", "10", "--nodes", "3",
        "--local-pods", "0", "--kubeconfig", str(tmp_path / "kubeconfig"),
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip

    async def command(text: str) -> bytes:
        process.stdin.write(text.encode() + b"\n")
        await process.stdin.drain()
        return await asyncio.wait_for(process.stdout.readline(), 30)

    try:
        url = (await asyncio.wait_for(process.stdout.readline(), 60)).split()[1].decode()
        assert (await command("add 4")).startswith(b"added 4")
        headers = {"Authorization": f"Bearer {DEFAULT_TOKEN}"}
        async with aiohttp.ClientSession(headers=headers) as session:
            async with session.get(f"{url}/api/v1/pods", params={"limit": "1"}) as response:
                version = (await response.json())["metadata"]["resourceVersion"]
            query = {"watch": "true", "resourceVersion": version, "fieldSelector": UNFINISHED_PODS}
            async with session.get(f"{url}/api/v1/pods", params=query) as response:
                rolled = json.loads((await command("rollout 4 3"))[len(b"rolled") :])
                lines = [await response.content.readline() for _ in range(rolled["events"])]
        events = [json.loads(line) for line in lines]
        assert rolled["count"] == 4 and rolled["events"] == 24 and len(rolled["waves"]) == 2
        steps = [(e["type"], e["object"]["metadata"]["name"]) for e in events]
        new, old = ["pod-14", "pod-15", "pod-16"], ["pod-10", "pod-11", "pod-12"]
        first_wave = (
            [("ADDED", n) for n in new] + [("MODIFIED", n) for n in new] * 2
            + [("MODIFIED", n) for n in old] * 2 + [("DELETED", n) for n in old]
        )  # fmt: skip
        assert steps[:18] == first_wave
        assert steps[18:] == [("ADDED", "pod-17"), ("MODIFIED", "pod-17"), ("MODIFIED", "pod-17"),
                              ("MODIFIED", "pod-13"), ("MODIFIED", "pod-13"),
                              ("DELETED", "pod-13")]  # fmt: skip
        started = events[6]["object"]  # pod-14, started on its node with its IP
        assert started["status"]["podIP"] == "10.64.0.14"
        assert started["status"]["hostIP"] == "10.1.0.3"  # node 14 % 3 = 2
        assert (await command("remove 4")).startswith(b"removed 4")
        # No added pod left: the next ones are numbered from the start again.
        assert (await command("add 1")).startswith(b"added 1")
        async with aiohttp.ClientSession(headers=headers) as session:
            async with session.get(f"{url}/api/v1/pods") as response:
                names = {p["metadata"]["name"] for p in (await response.json())["items"]}
        assert names == {f"pod-{k}" for k in range(11)}
    finally:
        process.kill()
        await process.wait()


async def test_rollout_bench_sees_each_state_change_reach_its_own_nodes_stream(tmp_path):
    """The scale section's rollout measurement with node streams, tiny: podiam-server takes
    every event the API server wrote, and every new pod's state and old pod's removal — two
    of each pod's six events — is seen by the simulated agent of that pod's node only."""
    import asyncio
    from types import SimpleNamespace

    from bench import kubeproc, procs, server_scale
    from certs.authority import generate_bundle, write_bundle
    from tests.support.moto_sts import MotoSts

    pods, nodes, replaced = 120, 6, 40
    tls = tmp_path / "tls"
    write_bundle(generate_bundle(), tls)
    sts = MotoSts()
    await asyncio.to_thread(sts.start)
    kube = server_scale._Kube(pods, nodes, tmp_path)
    await kube.start()
    server = server_scale._Server(kube, sts, tls)
    clients = []
    try:
        await server.start()
        hosts = [kubeproc.node_ip(n) for n in range(nodes)]
        for part in (hosts[:3], hosts[3:]):
            client = await procs.spawn(["-m", "bench.nodestreams"], core=None,
                                       stdin=asyncio.subprocess.PIPE)  # fmt: skip
            clients.append(client)
            spec = {"target": f"localhost:{server.port}", "tls": str(tls), "hosts": part}
            client.stdin.write(json.dumps(spec).encode() + b"\n")
            await client.stdin.drain()
        for client in clients:
            assert (await server_scale._line(client, b"ready", 60))["failed"] == 0
        options = SimpleNamespace(lifecycle_pods=replaced, scale_nodes=nodes)

        rolled = await server_scale._stream_lifecycle(server, clients, pods, options, wait=30)

        assert rolled["written"] == rolled["events"] == 6 * replaced
        assert rolled["state_changing"] == 2 * replaced
        assert rolled["missing"] == rolled["misrouted"] == 0
        assert 0 < rolled["updates"] <= 2 * replaced
        assert rolled["delivery_p99_ms"] >= rolled["delivery_p50_ms"] > 0
        # The cluster is back as it was: the next server measured lists the same pods.
        async with aiohttp.ClientSession() as session:
            assert await server.metric(session, "podiam_pods_indexed") == pods
    finally:
        for client in clients:
            await procs.stop(client)
        await server.stop()
        await kube.stop()
        await asyncio.to_thread(sts.stop)


def test_scale_section_reports_the_burst_and_the_rollout_as_two_watch_event_mixes(tmp_path):
    out, data = tmp_path / "report.md", tmp_path / "report.json"
    result = subprocess.run(
        [
            sys.executable, "-m", "bench", "--quick", "--sections", "scale",
            "--scale-pods", "300", "--scale-nodes", "10", "--scale-streams", "0",
            "--watch-events", "20", "--lifecycle-pods", "30", "--unary-calls", "50",
            "--repeat", "1", "--out", str(out), "--json", str(data),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=170,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(data.read_text())
    (section,) = report["sections"]
    mixes = next(t for t in section["tables"] if t["title"] == "watch events by mix")
    by_mix = {row[2]: dict(zip(mixes["columns"], row, strict=True)) for row in mixes["rows"]}
    burst = by_mix["pods added Running (each event changes a node's state)"]
    rollout = by_mix["pod lifecycle (rollout)"]
    assert burst["events"] == 20
    assert rollout["events"] == 6 * 30  # every event the API server wrote, taken
    (row,) = [r for r in section["data"]["rows"] if r["pods"]]
    assert row["lifecycle"]["events"] == row["lifecycle"]["written"] == 180
    checks = {check["name"]: check for check in report["checks"]}
    judged = checks["watch events/s, pod lifecycle (rollout) (largest size)"]
    assert judged["target"] == "≥ 20,000"
    assert judged["ok"] == (row["lifecycle"]["events_per_s"] >= 20000)
    worst = checks["watch events/s, every event changes a node's state (largest size)"]
    assert worst["target"] == "measured"
