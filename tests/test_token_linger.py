"""Token-bound credentials with a node-stream linger: a linger may hold back what gives an
answer, never what takes one away. With 50 ms, before the linger sent removals at once, the
agent answered a deleted pod's token after a new pod had its IP (tests/test_token_credentials.py
failed in 6 of 6 runs); the same test, against a server with that linger.
"""

from __future__ import annotations

import pytest

from tests.test_token_credentials import (  # noqa: F401 (the module's fixtures, used by name)
    agent,
    podiam,
    real,
    test_a_deleted_pods_token_is_refused_even_when_its_ip_is_reused_at_once,
)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server_flags() -> list[str]:
    return ["--node-stream-linger", "50ms"]
