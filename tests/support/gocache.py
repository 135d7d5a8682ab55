"""The tests' side of tests/support/gocache.sh: where a build script (tests/controlplane/build.sh,
tests/prometheus/build.sh) keeps the Go binaries the tests run, and a test's need of them, so
that each tool's support module says only which script, which binaries and what they are."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def bin_dir(script: Path, override: str) -> Path:
    """Where ``script`` puts (or would put) its binaries: ``script --print-bin-dir`` builds
    nothing; the environment variable ``override``, when set, names another directory."""
    chosen = os.environ.get(override)
    if chosen:
        return Path(chosen)
    result = subprocess.run(
        [str(script), "--print-bin-dir"], capture_output=True, text=True, check=True
    )
    return Path(result.stdout.strip())


def missing(directory: Path, binaries: Sequence[str]) -> list[str]:
    return [name for name in binaries if not os.access(directory / name, os.X_OK)]


def require(what: str, script: Path, directory: Path, binaries: Sequence[str]) -> Path:
    """``directory``, when it has every one of ``binaries``; else, outside CI, skip the test.
    Under CI=true a missing binary is a failure: .ci/run builds them first."""
    absent = missing(directory, binaries)
    if absent:
        message = (
            f"{what} not built ({', '.join(absent)} missing in {directory}); run "
            f"{script.relative_to(REPO)}"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return directory
