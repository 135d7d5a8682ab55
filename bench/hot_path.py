"""Agent hot path: many distinct pods asking for their role name and credentials, against a bare
aiohttp baseline serving the same bytes, same load generator, same run."""

from __future__ import annotations

import asyncio

from bench import procs
from bench.cluster import CREDENTIALS, NODE, LoopbackCluster, wait_served
from bench.report import Section


async def load(spec: dict, *, measured_pid: int) -> dict:
    return await procs.generate("bench.loadgen", spec, measured_pid=measured_pid)


async def start_baseline(cluster: LoopbackCluster, role: bytes, credentials: bytes):
    (cluster.work / "role.body").write_bytes(role)
    (cluster.work / "credentials.body").write_bytes(credentials)
    port = procs.free_port()
    process = await procs.spawn(
        [
            "-m", "bench.baseline", "--port", str(port),
            "--role-body-file", str(cluster.work / "role.body"),
            "--credentials-body-file", str(cluster.work / "credentials.body"),
        ],
        core=procs.cpu(procs.SERVED_CPU),
    )  # fmt: skip
    line = await asyncio.wait_for(process.stdout.readline(), 20)
    if line.strip() != b"listening":
        raise RuntimeError("the baseline server did not start")
    return process, port


async def run(section: Section, cluster: LoopbackCluster, options) -> None:
    pods = cluster.add_pods(options.pods, block=1, roles=options.roles, prefix="hot")
    await wait_served(cluster, pods)
    ip, _name, role = pods[0]
    status, role_body = await cluster.get(ip, CREDENTIALS)
    status2, credentials_body = await cluster.get(ip, CREDENTIALS + role)
    assert status == status2 == 200, (status, status2)
    baseline, baseline_port = await start_baseline(cluster, role_body, credentials_body)
    section.notes += [
        f"{options.pods} pods, each request from its pod's own 127.x source address, "
        f"{options.roles} roles (pods of a role share its session-name annotation); "
        f"{options.requests} timed requests per row after one untimed warm-up request per pod.",
        "baseline: a bare aiohttp server (same loop, one catch-all route, no access log) "
        "answering the same paths with the same bytes and content types, in its own process.",
        "agent and baseline each run pinned to one core; the load generator "
        "(`bench/loadgen.py`: asyncio on raw sockets, uvloop, pre-built requests, "
        "Content-Length framing) runs in its own process pinned to the other core.",
        "`agent CPU`/`base CPU`: CPU seconds the agent/baseline process used per wall second of "
        "the timed phase (1.00 = its core saturated: it is the bottleneck); `gen CPU`: the same "
        "for the load generator (the higher of its two runs); `gen faster`: the generator drove "
        "the baseline faster than the agent, so it was not what limited the agent.",
        f"each row is the best of {options.repeat} runs (agent and baseline interleaved); "
        "latencies are end to end at the generator, connection set-up included without "
        "keep-alive.",
        f"credentials body: {len(credentials_body)} bytes; role body: {len(role_body)} bytes.",
    ]
    table = section.table(
        "requests/s and latency (ms), agent vs bare aiohttp baseline",
        [
            "route", "keep-alive", "conc.", "agent req/s", "base req/s", "ratio",
            "agent p50", "agent p99", "agent p99.9", "base p50", "base p99", "base p99.9",
            "p99 ratio", "agent CPU", "base CPU", "gen CPU", "errors", "gen faster",
        ],
    )  # fmt: skip
    rows = []
    try:
        for keepalive in options.keepalive:
            for route, path_of in (("credentials", lambda r: CREDENTIALS + r), ("role", None)):
                if route not in options.routes:
                    continue
                targets = [
                    [pod_ip, path_of(role) if path_of else CREDENTIALS, {}]
                    for pod_ip, _n, role in pods
                ]
                for concurrency in options.concurrency:
                    spec = {
                        "host": NODE,
                        "targets": targets,
                        "requests": options.requests,
                        "concurrency": concurrency,
                        "keepalive": keepalive,
                    }
                    agent, base = await _pair(spec, cluster, baseline, baseline_port, options)
                    ratio = agent["rps"] / base["rps"] if base["rps"] else 0.0
                    p99_ratio = agent["p99_ms"] / base["p99_ms"] if base["p99_ms"] else 0.0
                    bad = (
                        agent["errors"]
                        + base["errors"]
                        + sum(v for k, v in agent["statuses"].items() if k != "200")
                        + sum(v for k, v in base["statuses"].items() if k != "200")
                    )
                    table.add(
                        route, "yes" if keepalive else "no", concurrency,
                        agent["rps"], base["rps"], f"{ratio:.2f}x",
                        agent["p50_ms"], agent["p99_ms"], agent["p999_ms"],
                        base["p50_ms"], base["p99_ms"], base["p999_ms"],
                        f"{p99_ratio:.2f}x", f"{agent['served_cpu']:.2f}",
                        f"{base['served_cpu']:.2f}",
                        f"{max(agent['generator_cpu'], base['generator_cpu']):.2f}", bad,
                        "yes" if base["rps"] > agent["rps"] else "no",
                    )  # fmt: skip
                    rows.append(
                        {
                            "route": route,
                            "keepalive": keepalive,
                            "concurrency": concurrency,
                            "agent": agent,
                            "baseline": base,
                            "ratio": ratio,
                            "p99_ratio": p99_ratio,
                        }
                    )
    finally:
        await procs.stop(baseline)
    section.data["rows"] = rows
    key_rows = [r for r in rows if r["route"] == "credentials" and r["keepalive"]]
    if key_rows:
        worst = min(r["ratio"] for r in key_rows)
        worst_p99 = max(r["p99_ratio"] for r in key_rows)
        section.check(
            "agent credentials, keep-alive: req/s vs baseline (worst concurrency)",
            "≥ 0.90x",
            f"{worst:.2f}x",
            worst >= 0.9,
        )
        section.check(
            "agent credentials, keep-alive: p99 vs baseline (worst concurrency)",
            "≤ 1.50x",
            f"{worst_p99:.2f}x",
            worst_p99 <= 1.5,
        )
    faster = sum(1 for r in rows if r["baseline"]["rps"] > r["agent"]["rps"])
    busiest = max((r[side]["generator_cpu"] for r in rows for side in ("agent", "baseline")),
                  default=0.0)  # fmt: skip
    section.notes.append(
        f"the generator drove the baseline faster than the agent in {faster} of {len(rows)} "
        f"rows (where the two are within noise of each other it may not), and never used more "
        f"than {busiest:.0%} of its core: it waits on the server, it is not the limit."
    )
    section.check(
        "load generator is not the bottleneck: its busiest row's CPU",
        "< 80% of its core",
        f"{busiest:.0%}; baseline faster than agent in {faster}/{len(rows)} rows",
        busiest < 0.8,
    )


async def _pair(spec, cluster, baseline, baseline_port, options) -> tuple[dict, dict]:
    """The best of ``options.repeat`` runs each for the agent and the baseline, interleaved:
    on a shared machine the slower runs measure the neighbours as much as the code."""
    agent_runs, base_runs = [], []
    for _ in range(options.repeat):
        agent_runs.append(
            await load({**spec, "port": cluster.agent_port}, measured_pid=cluster.agent_pid)
        )
        base_runs.append(await load({**spec, "port": baseline_port}, measured_pid=baseline.pid))
    return max(agent_runs, key=_rps), max(base_runs, key=_rps)


def _rps(run: dict) -> float:
    return run["rps"]
