"""The benchmark report: sections of tables, rendered as Markdown (and JSON), with the targets
checked as ratios against baselines measured in the same run."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)

    def add(self, *row: Any) -> None:
        self.rows.append(list(row))


@dataclass
class Check:
    """A target from the issue, as a ratio or a bound; ``ok`` None when it could not be judged."""

    name: str
    target: str
    measured: str
    ok: bool | None


@dataclass
class Section:
    key: str
    title: str
    notes: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    skipped: str = ""
    seconds: float = 0.0

    def table(self, title: str, columns: list[str]) -> Table:
        table = Table(title, columns)
        self.tables.append(table)
        return table

    def check(self, name: str, target: str, measured: str, ok: bool | None) -> None:
        self.checks.append(Check(name, target, measured, ok))


class Report:
    def __init__(self, *, options: dict[str, Any]) -> None:
        self.options = options
        self.sections: list[Section] = []
        self.started = time.time()
        # (title, file name beside the Markdown) of each plot drawn (bench/plots.py), or why none.
        self.images: list[tuple[str, str]] = []
        self.images_skipped = ""

    def section(self, key: str, title: str) -> Section:
        section = Section(key, title)
        self.sections.append(section)
        return section

    @property
    def checks(self) -> list[Check]:
        return [check for section in self.sections for check in section.checks]

    def markdown(self) -> str:
        out = [
            "# podiam benchmark report",
            "",
            f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(self.started))}",
            f"- machine: {platform.machine()}, {_cpus()} CPUs, Python {platform.python_version()}",
            f"- options: `{json.dumps(self.options, sort_keys=True)}`",
            "- wall-clock figures are from a shared machine: compare the ratios, which are "
            "against baselines measured in the same run.",
            "",
        ]
        if self.checks:
            out += [
                "## Targets",
                "",
                "| target | wanted | measured | |",
                "| --- | --- | --- | --- |",
            ]
            for check in self.checks:
                verdict = {True: "ok", False: "MISSED", None: "n/a"}[check.ok]
                out.append(f"| {check.name} | {check.target} | {check.measured} | {verdict} |")
            out.append("")
        for section in self.sections:
            out += [f"## {section.title}", ""]
            if section.skipped:
                out += [f"_Skipped: {section.skipped}_", ""]
                continue
            for note in section.notes:
                out.append(f"- {note}")
            if section.notes:
                out.append("")
            for table in section.tables:
                out += [f"**{table.title}**", ""]
                out.append("| " + " | ".join(table.columns) + " |")
                out.append("|" + "|".join(" --- " for _ in table.columns) + "|")
                for row in table.rows:
                    out.append("| " + " | ".join(_cell(value) for value in row) + " |")
                out.append("")
            out += [f"_section time: {section.seconds:.1f}s_", ""]
        if self.images or self.images_skipped:
            out += ["## Plots", ""]
            if self.images_skipped:
                out += [f"_No plots: {self.images_skipped}_", ""]
            for title, name in self.images:
                out += [f"**{title}**", "", f"![{title}]({name})", ""]
        return "\n".join(out)

    def as_json(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "options": self.options,
            "checks": [vars(check) for check in self.checks],
            "sections": [
                {
                    "key": s.key,
                    "title": s.title,
                    "skipped": s.skipped,
                    "seconds": s.seconds,
                    "notes": s.notes,
                    "tables": [
                        {"title": t.title, "columns": t.columns, "rows": t.rows} for t in s.tables
                    ],
                    "checks": [vars(check) for check in s.checks],
                    "data": s.data,
                }
                for s in self.sections
            ],
        }


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value >= 100:
            return f"{value:,.0f}"
        if value >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _cpus() -> int:
    import os

    return os.cpu_count() or 0
