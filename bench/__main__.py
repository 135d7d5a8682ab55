"""``python -m bench``: podiam's benchmarks, one report.

    python -m bench                        # everything, full sizes (about 18 minutes)
    python -m bench --quick                # everything, small sizes (about 3 minutes; CI smoke)
    python -m bench --sections hot,sts     # some sections only
    python -m bench --out report.md --json report.json

Sections: ``hot`` (agent hot path vs bare aiohttp and raw httptools+uvloop baselines, and a
victim pod's latency while another floods), ``client`` (botocore's full
credential fetch from pods in network namespaces; needs root), ``podstart`` (watch event to
credentials served), ``sts`` (AssumeRole calls for N pods sharing M roles), ``scale`` (server
initial sync, memory, watch events/s, unary calls/s vs a bare grpc.aio servicer), ``policy``
(one pod's policy decision under hostile ``permitted`` patterns vs a benign one), ``faults``
(failed requests, extra AssumeRole calls and wrong roles while replicas die, all servers are
down, the node is partitioned, pod IPs are reused, STS is down for 30 simulated minutes, the
Kubernetes API is down and its watches break, certificates rotate and the agent is rolled out;
the replica, outage, partition and churn-routes faults need root; ``--faults`` picks some),
and, only when asked for, ``realscale`` (the server against a real control plane with kwok's
fake nodes, side by side with the test double; about an hour at full size on two cores).
Figures are printed, never asserted: the machine may be shared and noisy, so the report compares
each figure with a baseline measured in the same run, and checks the issue's targets as ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

# This process serves gRPC and spawns many processes: gRPC's fork handlers are not wanted (the
# children exec at once), and its notice about skipping them is noise in the report.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from bench import procs
from bench.report import Report

SECTIONS = ("hot", "client", "podstart", "sts", "scale", "policy", "faults", "realscale")
_ON_REQUEST = {"realscale"}  # not in a plain `python -m bench`: it takes an hour
FAULTS = ("replica", "churn", "churn-routes", "sts-outage", "kube", "rotation", "rollout")
_NEEDS_CLUSTER = {"hot", "podstart", "sts"}


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (CI smoke, ~2 min)")
    parser.add_argument(
        "--sections",
        default=",".join(s for s in SECTIONS if s not in _ON_REQUEST),
        help=f"comma-separated, of {', '.join(SECTIONS)} (realscale only when named)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-report.md"), help="Markdown report")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    hot = parser.add_argument_group("hot: agent hot path")
    hot.add_argument("--pods", type=int, help="distinct pods (source addresses)")
    hot.add_argument("--roles", type=int, help="roles those pods share")
    hot.add_argument("--requests", type=int, help="timed requests per row")
    hot.add_argument("--concurrency", type=_ints, help="concurrencies, e.g. 1,16,64")
    hot.add_argument("--routes", default="credentials,role", help="credentials,role")
    hot.add_argument("--keepalive", default="yes,no", help="yes,no")
    hot.add_argument("--repeat", type=int, help="runs per row (agent and baselines interleaved)")
    hot.add_argument("--flood-connections", type=int, help="connections the flooding pod opens")
    hot.add_argument("--victim-requests", type=int, help="the victim pod's timed requests")
    client = parser.add_argument_group("client: botocore in network namespaces (root)")
    client.add_argument("--client-pods", type=int, help="pod namespaces fetching at once")
    client.add_argument("--client-fetches", type=int, help="credential fetches per pod")
    start = parser.add_argument_group("podstart")
    start.add_argument("--start-pods", type=int, help="pods started, one after another")
    sts = parser.add_argument_group("sts: STS economy")
    sts.add_argument("--sts-pods", type=int, help="pods (N)")
    sts.add_argument("--sts-roles", type=int, help="roles (M)")
    sts.add_argument("--sts-workloads", type=int, help="Deployments the N pods belong to")
    sts.add_argument("--sts-burst-pods", type=int, help="new pods of one new Deployment")
    sts.add_argument("--sts-flood", type=int, help="new identities appearing at once")
    sts.add_argument("--sts-flood-held", type=int, help="held identities due for refresh")
    sts.add_argument("--sts-flood-qps", type=float, help="--sts-qps of the flood run")
    sts.add_argument("--sts-throttle-seconds", type=float, help="how long STS throttles")
    scale = parser.add_argument_group("scale: server")
    scale.add_argument("--scale-pods", type=_ints, help="cluster sizes, e.g. 10000,50000,100000")
    scale.add_argument("--watch-events", type=int, help="pods added after the sync, as events")
    scale.add_argument(
        "--lifecycle-pods",
        type=int,
        help="pods a rollout replaces, each through its lifecycle's watch events (0: none)",
    )
    scale.add_argument("--unary-calls", type=int, help="GetPodCredentials calls per measurement")
    scale.add_argument("--unary-concurrency", type=int, help="concurrent unary calls")
    scale.add_argument("--scale-nodes", type=int, help="nodes the pods spread over")
    scale.add_argument(
        "--scale-streams", type=int, help="simulated agents, one node stream each (0: none)"
    )
    scale.add_argument(
        "--scale-agent-processes", type=int,
        help="processes the simulated agents are spread over (all on the load core)",
    )  # fmt: skip
    scale.add_argument(
        "--scale-baseline",
        metavar="REV",
        help="also measure podiam-server as of this git revision (before/after in one run)",
    )
    scale.add_argument(
        "--scale-profile",
        metavar="DIR",
        help="record py-spy profiles (collapsed stacks) of both processes during each sync",
    )
    real = parser.add_argument_group("realscale: server against a real control plane")
    real.add_argument("--real-scale", help="sizes as NODESxPODS_PER_NODE, e.g. 1000x110,5000x22")
    faults = parser.add_argument_group("faults: static stability")
    faults.add_argument("--fault-pods", type=int, help="pods with cached credentials under load")
    faults.add_argument("--fault-load-seconds", type=float, help="load around a replica kill")
    faults.add_argument("--outage-seconds", type=float, help="how long every replica is down")
    faults.add_argument("--churn-replacements", type=int, help="pod replacements on reused IPs")
    faults.add_argument("--churn-ips", type=int, help="size of the reused IP pool")
    faults.add_argument(
        "--faults", default=",".join(FAULTS), help=f"comma-separated, of {', '.join(FAULTS)}"
    )
    faults.add_argument("--sts-outage-minutes", type=int, help="simulated minutes STS is down")
    faults.add_argument("--sts-outage-held", type=int, help="identities held through it")
    faults.add_argument(
        "--sts-outage-step-seconds", type=float, help="real seconds per simulated minute"
    )
    faults.add_argument("--kube-outage-seconds", type=float, help="how long the API is down")
    faults.add_argument("--kube-pods", type=int, help="pods probed through the API faults")
    faults.add_argument("--rotation-load-seconds", type=float, help="load around a rotation")
    faults.add_argument("--rollout-load-seconds", type=float, help="load around an agent rollout")
    return parser


_FULL = {
    "pods": 1000,
    "roles": 10,
    "requests": 10000,
    "concurrency": [1, 16, 64],
    "repeat": 3,
    "flood_connections": 2000,
    "victim_requests": 3000,
    "client_pods": 40,
    "client_fetches": 25,
    "start_pods": 200,
    "sts_pods": 1000,
    "sts_roles": 10,
    "sts_workloads": 50,
    "sts_burst_pods": 1000,
    "sts_flood": 20000,
    "sts_flood_held": 500,
    "sts_flood_qps": 50.0,
    "sts_throttle_seconds": 10.0,
    "scale_pods": [10000, 50000, 100000],
    "real_scale": "1000x110,5000x22",
    "watch_events": 10000,
    "lifecycle_pods": 30000,
    "unary_calls": 5000,
    "unary_concurrency": 32,
    "scale_nodes": 5000,
    "scale_streams": 5000,
    "scale_agent_processes": None,  # bench/server_scale.py AGENT_PROCESSES
    "scale_baseline": None,
    "scale_profile": None,
    "fault_pods": 4,
    "fault_load_seconds": 10.0,
    "outage_seconds": 60.0,
    "churn_replacements": 10000,
    "churn_ips": 16,
    "sts_outage_minutes": 30,
    "sts_outage_held": 50,
    "sts_outage_step_seconds": 2.0,
    "kube_outage_seconds": 30.0,
    "kube_pods": 60,
    "rotation_load_seconds": 20.0,
    "rollout_load_seconds": 20.0,
}
_QUICK = {
    "pods": 200,
    "roles": 4,
    "requests": 3000,
    "concurrency": [1, 32],
    "repeat": 2,
    "flood_connections": 2000,
    "victim_requests": 1000,
    "client_pods": 8,
    "client_fetches": 10,
    "start_pods": 40,
    "sts_pods": 200,
    "sts_roles": 4,
    "sts_workloads": 20,
    "sts_burst_pods": 100,
    "sts_flood": 200,
    "sts_flood_held": 10,
    "sts_flood_qps": 50.0,
    "sts_throttle_seconds": 1.0,
    "scale_pods": [10000],
    "real_scale": "20x5",
    "watch_events": 2000,
    "lifecycle_pods": 3000,
    "unary_calls": 1500,
    "unary_concurrency": 32,
    "scale_nodes": 500,
    "scale_streams": 500,
    "scale_baseline": None,
    "scale_profile": None,
    "fault_pods": 2,
    "fault_load_seconds": 4.0,
    "outage_seconds": 5.0,
    "churn_replacements": 300,
    "churn_ips": 4,
    "sts_outage_minutes": 5,
    "sts_outage_held": 10,
    "sts_outage_step_seconds": 0.3,
    "kube_outage_seconds": 3.0,
    "kube_pods": 12,
    "rotation_load_seconds": 6.0,
    "rollout_load_seconds": 6.0,
}


def parse_options(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    options = parser.parse_args(argv)
    defaults = _QUICK if options.quick else _FULL
    for name, value in defaults.items():
        if getattr(options, name) is None:
            setattr(options, name, value)
    options.sections = [s.strip() for s in options.sections.split(",") if s.strip()]
    unknown = set(options.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    options.faults = [f.strip() for f in options.faults.split(",") if f.strip()]
    unknown_faults = set(options.faults) - set(FAULTS)
    if unknown_faults:
        parser.error(f"unknown faults: {', '.join(sorted(unknown_faults))}")
    options.routes = [r.strip() for r in options.routes.split(",") if r.strip()]
    options.keepalive = [k.strip() in ("yes", "true", "1") for k in options.keepalive.split(",")]
    return options


async def run(options: argparse.Namespace) -> Report:
    from bench import cluster as loopback

    loopback.quiet_logs()
    shown = {k: v for k, v in vars(options).items() if k not in ("out", "json")}
    report = Report(options=shown)
    wanted = options.sections
    titles = {
        "hot": "Agent hot path",
        "client": "Real clients: botocore's full credential fetch from pods",
        "podstart": "Pod start: watch event to credentials served",
        "sts": "STS economy",
        "scale": "Server scale",
        "policy": "Hostile policy: decision time under pathological patterns",
        "faults": "Faults: static stability under load",
        "realscale": "Server scale on a real control plane (kwok) vs the test double",
    }
    sections = {key: report.section(key, titles[key]) for key in SECTIONS if key in wanted}
    shared = None
    try:
        if _NEEDS_CLUSTER & set(wanted):
            shared = loopback.LoopbackCluster()
            await shared.__aenter__()
        for key, section in sections.items():
            started = time.perf_counter()
            print(f"bench: {section.title} ...", file=sys.stderr, flush=True)
            try:
                await _SECTION_RUNNERS[key](section, shared, options)
            except _Skip as skip:
                section.skipped = str(skip)
            section.seconds = time.perf_counter() - started
    finally:
        if shared is not None:
            await shared.__aexit__(None, None, None)
    return report


class _Skip(Exception):
    pass


async def _hot(section, cluster, options):
    from bench import hot_path

    await hot_path.run(section, cluster, options)


async def _client(section, cluster, options):
    from bench import real_client

    problem = real_client.problem()
    if problem:
        raise _Skip(problem)
    await real_client.run(section, options)


async def _podstart(section, cluster, options):
    from bench import pod_start

    await pod_start.run(section, cluster, options)


async def _sts(section, cluster, options):
    from bench import sts_economy

    await sts_economy.run(section, cluster, options)


async def _scale(section, cluster, options):
    from bench import server_scale

    await server_scale.run(section, options)


async def _policy(section, cluster, options):
    from bench import hostile_policy

    await hostile_policy.run(section, options)


async def _faults(section, cluster, options):
    from bench import faults

    await faults.run(section, options)


async def _realscale(section, cluster, options):
    from bench import real_scale

    problem = real_scale.problem()
    if problem:
        raise _Skip(problem)
    await real_scale.run(section, options)


_SECTION_RUNNERS = {
    "hot": _hot,
    "client": _client,
    "podstart": _podstart,
    "sts": _sts,
    "scale": _scale,
    "policy": _policy,
    "faults": _faults,
    "realscale": _realscale,
}


def _draw(report: Report, out: Path) -> None:
    """PNG plots beside the Markdown report, named after it (bench-report-latency.png, ...)."""
    from bench import plots

    report.images_skipped = plots.available()
    if report.images_skipped:
        return
    data = json.loads(json.dumps(report.as_json(), default=str))
    drawn = plots.write_plots(data, out.parent, out.stem)
    report.images = [(title, path.name) for title, path in drawn]


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    # This process (API server, STS, podiam-server for the loopback sections) shares the load
    # generator's core; the process under test has the other one to itself.
    procs.pin(procs.cpu(procs.LOAD_CPU))
    procs.raise_open_files_limit()
    report = asyncio.run(run(options))
    _draw(report, options.out)
    text = report.markdown()
    options.out.write_text(text)
    if options.json is not None:
        options.json.write_text(json.dumps(report.as_json(), indent=2, default=str))
    print(text)
    print(f"bench: report written to {options.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
