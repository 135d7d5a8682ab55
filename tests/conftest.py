"""Shared fixtures: real TLS material, a real STS (moto in server mode), and the components
built on them (tests/support/fixtures.py)."""

pytest_plugins = [
    "tests.support.tls",
    "tests.support.moto_sts",
    "tests.support.fixtures",
    "tests.support.controlplane",
    "tests.support.clusters",
]
