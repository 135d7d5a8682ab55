"""IMDSv2 tokens: bound to the caller's IP, and valid across agent restarts on the same node
(SDKs such as the Rust one keep a token for its whole TTL; see agent/tokens.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.tokens import TokenAuthority, key_for_node

POD = "10.201.1.5"


@pytest.fixture
def agent_key(tmp_path: Path) -> Path:
    path = tmp_path / "agent-key.pem"
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a real key, only its bytes matter\n")
    return path


def authority(key_file: Path, node: str = "worker-1|10.200.0.2") -> TokenAuthority:
    return TokenAuthority(key=key_for_node(key_file, node))


def test_token_minted_before_an_agent_restart_is_honoured_after_it(agent_key: Path) -> None:
    token = authority(agent_key).mint(POD, 21600)
    restarted = authority(agent_key)
    assert restarted.valid(token, POD)
    assert not restarted.valid(token, "10.201.1.6")  # still bound to the pod's address


def test_token_from_another_nodes_agent_is_refused(agent_key: Path) -> None:
    token = authority(agent_key, "worker-1|10.200.0.2").mint(POD, 60)
    assert not authority(agent_key, "worker-2|10.200.0.3").valid(token, POD)


def test_new_agent_key_invalidates_old_tokens(agent_key: Path, tmp_path: Path) -> None:
    token = authority(agent_key).mint(POD, 60)
    rotated = tmp_path / "rotated-key.pem"
    rotated.write_bytes(agent_key.read_bytes() + b"rotated\n")
    assert not authority(rotated).valid(token, POD)


def test_expired_token_is_refused() -> None:
    now = [1_000_000.0]
    tokens = TokenAuthority(key=b"k" * 32, clock=lambda: now[0])
    token = tokens.mint(POD, 5)
    assert tokens.valid(token, POD)
    now[0] += 5
    assert not tokens.valid(token, POD)
