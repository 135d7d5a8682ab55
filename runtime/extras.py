"""A program whose extra is not installed says so in one line instead of a traceback.

The podiam distribution's base installs only what every component needs; ``podiam[agent]`` and
``podiam[server]`` add each program's own libraries. Installing the base alone (``pip install
podiam``) still puts all three console scripts on the PATH, so each program checks its extra
before importing anything from it.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

DISTRIBUTION = "podiam"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def missing_requirements(extra: str, *, distribution: str = DISTRIBUTION) -> list[str]:
    """The distributions ``distribution[extra]`` requires that are not installed; empty when
    the extra is complete, or when ``distribution`` itself is not installed (run from a source
    tree, where nothing can be told)."""
    try:
        requirements = metadata.requires(distribution) or []
    except metadata.PackageNotFoundError:
        return []
    marker = re.compile(rf"""\bextra\s*==\s*["']{re.escape(extra)}["']""")
    missing = []
    for requirement in requirements:
        name, _, markers = requirement.partition(";")
        found = _NAME.match(name.strip())
        if not found or not marker.search(markers):
            continue
        try:
            metadata.distribution(found[0])
        except metadata.PackageNotFoundError:
            missing.append(found[0])
    return missing


def require_extra(extra: str, *, prog: str) -> None:
    """Exit with status 1 and one line on stderr when ``podiam[extra]`` is not fully installed."""
    missing = missing_requirements(extra)
    if missing:
        sys.exit(
            f"{prog}: error: needs the [{extra}] extra, which is not installed"
            f" (missing {', '.join(missing)}): pip install '{DISTRIBUTION}[{extra}]'"
        )
