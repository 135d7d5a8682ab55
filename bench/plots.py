"""Pictures for the benchmark report, where a reader would rather look than read: the agent's
latency distribution against its baselines (bare aiohttp, a raw httptools+uvloop protocol),
AssumeRole calls over the simulated hour, and the server's memory and initial sync time against
the cluster's size.

Drawn from the report's JSON (each section's ``data``), so a saved ``bench-report.json`` can be
drawn again: ``python -m bench.plots bench-report.json``. matplotlib comes with the bench extra;
without it the report says so and carries no pictures.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from itertools import accumulate
from pathlib import Path
from typing import Any

AGENT, BASELINE, RAW = "#1f77b4", "#7f7f7f", "#2ca02c"
# The hot section's servers, each measured with the same bytes in the same run (bench/hot_path.py).
_LATENCY_SIDES = (
    ("agent", AGENT, "podiam-agent"),
    ("aiohttp", BASELINE, "bare aiohttp"),
    ("raw", RAW, "raw httptools+uvloop"),
)


def available() -> str:
    """Empty when plots can be drawn; otherwise why not."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]')"
    return ""


def write_plots(report: Mapping[str, Any], directory: Path, stem: str) -> list[tuple[str, Path]]:
    """Draw every plot the report has data for into ``directory`` as ``<stem>-<name>.png``;
    (title, path) of each."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, whatever the environment says
    sections = {section["key"]: section for section in report.get("sections", [])}
    drawn = []
    for key, name, title, draw in (
        ("hot", "latency", "Agent latency distribution vs its baselines", _latency),
        ("sts", "assume-role-hour", "AssumeRole calls over a simulated hour", _hour),
        ("scale", "server-scale", "Server memory and initial sync vs pods", _scale),
    ):
        section = sections.get(key)
        if section is None or section.get("skipped"):
            continue
        path = directory / f"{stem}-{name}.png"
        if draw(section.get("data") or {}, path):
            drawn.append((title, path))
    return drawn


def _latency(data: Mapping[str, Any], path: Path) -> bool:
    rows = [r for r in data.get("rows", []) if r["route"] == "credentials"]
    sides = [side for side, *_ in _LATENCY_SIDES]
    rows = [r for r in rows if all(r.get(side, {}).get("quantiles_ms") for side in sides)]
    concurrencies = sorted({r["concurrency"] for r in rows})
    if not concurrencies:
        return False
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    figure, axes = plt.subplots(
        1, len(concurrencies), figsize=(4.2 * len(concurrencies), 3.8), sharey=True, squeeze=False
    )
    for axis, concurrency in zip(axes[0], concurrencies, strict=True):
        for row in (r for r in rows if r["concurrency"] == concurrency):
            style = "-" if row["keepalive"] else "--"
            connections = "keep-alive" if row["keepalive"] else "new connections"
            for who, colour, label in _LATENCY_SIDES:
                fractions, ms = zip(*row[who]["quantiles_ms"], strict=True)
                axis.plot(ms, fractions, style, color=colour, label=f"{label}, {connections}")
        axis.set_xscale("log")
        axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_title(f"{concurrency} concurrent")
        axis.set_xlabel("latency (ms, log)")
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("fraction of requests at or below")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=2, fontsize="small", frameon=False)
    figure.suptitle("Credentials requests: podiam-agent vs a bare aiohttp server, same bytes")
    return _save(figure, path, bottom=0.14)


def _hour(data: Mapping[str, Any], path: Path) -> bool:
    hour = data.get("hour") or {}
    shared = hour.get("calls_per_minute")
    if not shared:
        return False
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 3.8))
    # Cumulative: each refresh round is one step, however the round's calls spread over the
    # simulated minutes while STS answers them.
    contrast = hour.get("contrast_calls_per_minute") or []
    if contrast:
        axis.step(
            range(len(contrast)), list(accumulate(contrast)), where="post", color=BASELINE,
            label=f"{hour.get('contrast_pods')} pods, one session each",
        )  # fmt: skip
    axis.step(
        range(len(shared)), list(accumulate(shared)), where="post", color=AGENT, linewidth=2,
        label=f"{hour.get('pods')} pods sharing {hour.get('roles')} sessions",
    )  # fmt: skip
    axis.set_xlabel("simulated minute (minute 0: pods appear, first fetch)")
    axis.set_ylabel("AssumeRole calls so far")
    axis.set_title("AssumeRole calls over a simulated hour (credentials refreshed every 25 min)")
    axis.legend()
    axis.grid(True, axis="y", alpha=0.3)
    return _save(figure, path)


def _scale(data: Mapping[str, Any], path: Path) -> bool:
    rows = sorted((r for r in data.get("rows", []) if "rss_mb" in r), key=lambda r: r["pods"])
    if len(rows) < 2:
        return False
    import matplotlib.pyplot as plt

    pods = [r["pods"] for r in rows]
    figure, (memory, sync) = plt.subplots(1, 2, figsize=(9, 3.6))
    memory.plot(pods, [r["rss_mb"] for r in rows], "o-", color=AGENT, label="resident")
    memory.plot(pods, [r["peak_rss_mb"] for r in rows], "o--", color=BASELINE, label="peak")
    memory.set_ylabel("podiam-server memory (MB)")
    memory.legend()
    sync.plot(pods, [r["sync_s"] for r in rows], "o-", color=AGENT)
    sync.set_ylabel("initial list and index (s)")
    for axis in (memory, sync):
        axis.set_xlabel("pods in the cluster")
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
    figure.suptitle("podiam-server against cluster size")
    return _save(figure, path)


def _save(figure, path: Path, *, bottom: float = 0.0) -> bool:
    import matplotlib.pyplot as plt

    figure.tight_layout(rect=(0, bottom, 1, 1))  # room for a legend below, when there is one
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.plots bench-report.json", file=sys.stderr)
        return 2
    report_path = Path(args[0])
    problem = available()
    if problem:
        print(f"bench.plots: {problem}", file=sys.stderr)
        return 1
    for title, path in write_plots(
        json.loads(report_path.read_text()), report_path.parent, report_path.stem
    ):
        print(f"{path}: {title}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
