"""One pod request as the metadata listener's async handlers see it.

Only requests that leave the hot path become one of these (the hot path reads the parser's
fields directly): the raw target and headers as the pod sent them, never decoded or
normalised — `agent.paths` judges the raw path — and the caller's address, which is who the
pod is.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str  # the raw request target, query string included, decoded as latin-1
    headers: dict[bytes, bytes]  # lower-cased names; the first of repeated headers
    ip: str  # the caller's (source) address

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    def header(self, name: str) -> str | None:
        """A header's value as latin-1 text (which never fails to decode), or None."""
        value = self.headers.get(name.lower().encode())
        return None if value is None else value.decode("latin-1")

    def query_value(self, name: str) -> str | None:
        for key, value in parse_qsl(self.query, keep_blank_values=True):
            if key == name:
                return value
        return None
