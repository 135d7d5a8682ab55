"""Hostile policy: the time one pod's policy decision takes when its namespace's ``permitted``
pattern is written to stall a matcher, next to a benign pattern measured in the same run.

Every decision runs on the server's event loop, so its time is what every other namespace
waits. RE2 bounds it (linear in the role, which IAM's limits keep under ~600 characters, and in
the compiled pattern, which podiam keeps under 64 KiB). Python's ``re`` is shown on the issue's
pattern at small sizes only, to show why: its time doubles with each ``a``.
"""

from __future__ import annotations

import re
import statistics
import time

from bench.report import Section
from server.arn import RoleResolver
from server.pods import namespace_from_object, pod_from_object
from server.policy import grant_for_pod
from tests.support.objects import namespace_object, pod_object
from tests.support.server import BASE_ARN

# (label, pattern, role maker): each role is distinct, so the per-pattern memo never answers.
_CASES = [
    ("benign (baseline)", "app-.*", lambda n: f"app-reader-{n}"),
    ("(a+)+$, 500-char role", "(a+)+$", lambda n: "a" * 435 + "/" + "a" * 57 + f"{n:06d}="),
    ("(a+)+$, the issue's 30 a's", "(a+)+$", lambda n: "a" * 30 + f"{n:06d}="),
    ("(a or aa)* x150, 500-char role", "(a|aa)*" * 150, lambda n: "a" * 435 + "/" + f"{n:06d}="),
    ("[a-z/=]*a? x300", "[a-z/=]*a?" * 300, lambda n: "a" * 435 + "/" + f"{n:06d}" + "a" * 57),
]


def _decide_times(pattern: str, roles: list[str]) -> list[float]:
    resolver = RoleResolver(BASE_ARN)
    namespace = namespace_from_object(namespace_object("bench", permitted=pattern))
    times = []
    for n, role in enumerate(roles):
        pod = pod_from_object(pod_object("bench", f"pod-{n}", role=role))
        started = time.perf_counter()
        grant_for_pod(pod, namespace, resolver=resolver, session_name=lambda p: "s")
        times.append(time.perf_counter() - started)
    return times


async def run(section: Section, options) -> None:
    decisions = 50 if options.quick else 500
    table = section.table(
        "One pod's policy decision (RE2), distinct roles",
        ["pattern", "role chars", "decisions", "median µs", "max µs", "ratio to baseline"],
    )
    baseline = None
    worst = 0.0
    for label, pattern, role_for in _CASES:
        roles = [role_for(n) for n in range(decisions)]
        if namespace_from_object(namespace_object("bench", permitted=pattern)).pattern is None:
            table.add(label, len(roles[0]), 0, "refused", "refused", "-")
            continue
        times = _decide_times(pattern, roles)
        median = statistics.median(times)
        baseline = baseline or median
        if label != "benign (baseline)":
            worst = max(worst, max(times))
        table.add(
            label,
            len(roles[0]),
            decisions,
            round(median * 1e6, 1),
            round(max(times) * 1e6, 1),
            round(median / baseline, 1),
        )

    backtracking = section.table(
        "Python re (what podiam no longer uses) on (a+)+$ against a's and '='",
        ["a's", "seconds"],
    )
    compiled = re.compile("(a+)+$")
    for count in (16, 18, 20) if options.quick else (16, 18, 20, 22):
        started = time.perf_counter()
        compiled.fullmatch("a" * count + "=")
        backtracking.add(count, round(time.perf_counter() - started, 4))
    section.notes.append(
        "Python re doubles per added 'a': 30 a's took 151 s in the issue; 500 would never end."
    )
    section.data = {"worst_hostile_seconds": worst}
    section.check(
        "hostile pattern decision well inside a pod's 1 s metadata budget",
        "< 0.1 s",
        f"{worst * 1000:.2f} ms",
        worst < 0.1,
    )
