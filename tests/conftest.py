"""Shared fixtures: real TLS material and a real STS (moto in server mode)."""

pytest_plugins = [
    "tests.support.tls",
    "tests.support.moto_sts",
    "tests.support.controlplane",
    "tests.support.clusters",
]
