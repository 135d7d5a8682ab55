"""Real TLS material for tests: a good bundle and an unrelated one signed by another CA.

Use the session fixture ``tls_dirs`` (register this module as a plugin, e.g.
``pytest_plugins = ["tests.support.tls"]`` in the root conftest), or call ``make_tls_dirs``.

The "foreign" TlsFiles trust the *good* CA, so a foreign agent gets as far as presenting its
certificate to a good server (and a good agent gets as far as seeing a foreign server's
certificate): a refusal then proves that the peer's certificate was checked, not that the
refusing side could not verify the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from certs.authority import generate_bundle, write_bundle
from certs.tls import TlsFiles


@dataclass(frozen=True, slots=True)
class TlsDirs:
    good: Path  # ca.pem, server.pem, server-key.pem, agent.pem, agent-key.pem
    foreign: Path  # the same files, from another CA
    server: TlsFiles  # good server: good cert, requires clients signed by the good CA
    agent: TlsFiles  # good agent: good client cert, trusts the good CA
    foreign_agent: TlsFiles  # client cert from the foreign CA; trusts the good CA
    foreign_server: TlsFiles  # server cert from the foreign CA; accepts good-CA clients


def make_tls_dirs(base: Path) -> TlsDirs:
    """Write ``base/good`` and ``base/foreign``, each with the default server names."""
    good, foreign = Path(base) / "good", Path(base) / "foreign"
    write_bundle(generate_bundle(), good)
    write_bundle(generate_bundle(), foreign)
    good_ca = good / "ca.pem"
    return TlsDirs(
        good=good,
        foreign=foreign,
        server=TlsFiles.server_in(good),
        agent=TlsFiles.agent_in(good),
        foreign_agent=TlsFiles(
            cert=foreign / "agent.pem", key=foreign / "agent-key.pem", ca=good_ca
        ),
        foreign_server=TlsFiles(
            cert=foreign / "server.pem", key=foreign / "server-key.pem", ca=good_ca
        ),
    )


@pytest.fixture(scope="session")
def tls_dirs(tmp_path_factory: pytest.TempPathFactory) -> TlsDirs:
    return make_tls_dirs(tmp_path_factory.mktemp("tls"))
