"""HTTP/1.1 responses as the bytes the metadata listener writes.

The hot path writes a response rendered once (per credential set, per role name, per refusal
kind) instead of building one per request, so rendering lives here, apart from the listener
and the routes: a response is its status line, a fixed small set of headers and its body, in
two forms — for a connection that stays open and for one that closes after it.

Headers are what real IMDS sends and SDKs read: ``Content-Type`` and ``Content-Length``, plus
``Connection: close`` when the connection ends. No ``Date`` (it would force a render per
second; no SDK reads it) and no ``Server``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus

TEXT = "text/plain; charset=utf-8"
# Real IMDS serves the credentials document as text/plain; SDKs parse it as JSON regardless.
PLAIN = "text/plain"


@dataclass(frozen=True, slots=True)
class Rendered:
    """One response, ready to write: ``keep_alive`` and ``close`` differ only in the
    ``Connection`` header; ``head_keep_alive`` / ``head_close`` answer a HEAD request."""

    status: int
    keep_alive: bytes
    close: bytes
    head_keep_alive: bytes
    head_close: bytes

    def bytes_for(self, *, keep_alive: bool, head: bool = False) -> bytes:
        if head:
            return self.head_keep_alive if keep_alive else self.head_close
        return self.keep_alive if keep_alive else self.close


@dataclass(frozen=True, slots=True)
class Response:
    """What an async handler answers; the listener renders it once, for this request."""

    status: int
    body: bytes = b""
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def text(cls, text: str, *, status: int = 200, headers: Iterable[tuple[str, str]] = ()):
        return cls(status, text.encode(), TEXT, tuple(headers))

    def render(self) -> Rendered:
        return render(self.status, self.body, self.content_type, self.headers)


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def render(
    status: int,
    body: bytes,
    content_type: str = TEXT,
    headers: Iterable[tuple[str, str]] = (),
) -> Rendered:
    lines = [f"HTTP/1.1 {status} {_reason(status)}"]
    if status != 304 and status >= 200:
        lines.append(f"Content-Type: {content_type}")
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append(f"Content-Length: {len(body)}")
    head = "\r\n".join(lines).encode("latin-1")
    keep = head + b"\r\n\r\n"
    close = head + b"\r\nConnection: close\r\n\r\n"
    return Rendered(status, keep + body, close + body, keep, close)


@functools.lru_cache(maxsize=4096)
def text(body: str, status: int = 200, content_type: str = TEXT) -> Rendered:
    """A small fixed text answer (a role name, a refusal), rendered once and remembered."""
    return render(status, body.encode(), content_type)
