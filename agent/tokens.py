"""IMDSv2 session tokens, minted by the agent and bound to the caller's IP.

A token is its expiry and a MAC over (expiry, caller IP) under a key that lives only in this
agent's memory, so tokens need no storage, a token taken from pod A is worthless to pod B, and a
restarted agent invalidates every token (SDKs then fetch a new one, as they do after expiry).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct
import time

MIN_TTL = 1
MAX_TTL = 21600
_EXPIRY = struct.Struct(">Q")
_MAC_BYTES = 24


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
            raw = base64.urlsafe_b64decode(token.encode("ascii"))
        except (binascii.Error, UnicodeEncodeError, ValueError):
            return False
        if len(raw) != _EXPIRY.size + _MAC_BYTES:
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
    """The TTL a token request asks for, or None when the header is missing or invalid."""
    if header is None or not header.strip().isdigit():
        return None
    ttl = int(header.strip())
    return ttl if MIN_TTL <= ttl <= MAX_TTL else None
