"""Reading one value from a Prometheus text exposition, for tests and benches that poll a
process's /metrics for a single unlabelled counter or gauge."""

from __future__ import annotations


def unlabelled_value(text: str, name: str) -> float:
    """The value of the unlabelled sample ``name`` in ``text``; 0 while the process has none
    (a counter not yet incremented is absent from some expositions)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0
