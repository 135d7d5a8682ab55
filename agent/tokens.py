"""IMDSv2 session tokens, minted by the agent and bound to the caller's IP.

A token is its expiry and a MAC over (expiry, caller IP), so tokens need no storage and a token
taken from pod A is worthless to pod B.

Tokens must outlive the agent process. Real IMDS never invalidates a token before its TTL, and
SDKs rely on that: the AWS SDK for Rust caches its token for the whole TTL (six hours by
default) and, answered 401, retries with the same token, so a pod whose tokens died with an
agent restart (every DaemonSet rollout) could not refresh its credentials for hours
(``tests/test_sdk_matrix.py`` restarts the agent under every SDK to show it). So the MAC key is
derived (`key_for_node`) from the agent's TLS private key, which survives restarts and is known
only to agents, and from the node's name and address, so that each node has its own key. A new
agent key (certificate rotation followed by a restart) still invalidates old tokens.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct
import time
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MIN_TTL = 1
MAX_TTL = 21600
_EXPIRY = struct.Struct(">Q")
_MAC_BYTES = 24


def key_for_node(secret_file: Path, node: str) -> bytes:
    """The token MAC key for ``node``, derived from ``secret_file`` (the agent's private key)."""
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=b"podiam IMDSv2 tokens|" + node.encode(),
    ).derive(secret_file.read_bytes())


class TokenAuthority:
    def __init__(self, *, key: bytes | None = None, clock=time.time) -> None:
        self._key = key or os.urandom(32)
        self._clock = clock

    def mint(self, caller_ip: str, ttl_seconds: int) -> str:
        if not MIN_TTL <= ttl_seconds <= MAX_TTL:
            raise ValueError(f"TTL must lie between {MIN_TTL} and {MAX_TTL} seconds")
        expiry = _EXPIRY.pack(int(self._clock()) + ttl_seconds)
        return base64.urlsafe_b64encode(expiry + self._mac(expiry, caller_ip)).decode()

    def valid(self, token: str, caller_ip: str) -> bool:
        try:
            encoded = token.encode("ascii")
            raw = base64.urlsafe_b64decode(encoded)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            return False
        if len(raw) != _EXPIRY.size + _MAC_BYTES:
            return False
        # Strictly the encoding mint() wrote: the decoder skips bytes after the padding and
        # ignores unused low bits, so other spellings of a token would pass otherwise.
        if base64.urlsafe_b64encode(raw) != encoded:
            return False
        expiry, mac = raw[: _EXPIRY.size], raw[_EXPIRY.size :]
        if not hmac.compare_digest(mac, self._mac(expiry, caller_ip)):
            return False
        return _EXPIRY.unpack(expiry)[0] > self._clock()

    def _mac(self, expiry: bytes, caller_ip: str) -> bytes:
        return hmac.new(self._key, expiry + caller_ip.encode(), hashlib.sha256).digest()[
            :_MAC_BYTES
        ]


def parse_ttl(header: str | None) -> int | None:
    """The TTL a token request asks for, or None when the header is missing or invalid: ASCII
    digits only (``str.isdigit`` also accepts "²" and "١٢", which ``int`` then refuses or
    reads), and few enough that no huge number is ever built."""
    if header is None:
        return None
    text = header.strip()
    if not 1 <= len(text) <= 5 or not text.isascii() or not text.isdigit():
        return None
    ttl = int(text)
    return ttl if MIN_TTL <= ttl <= MAX_TTL else None
