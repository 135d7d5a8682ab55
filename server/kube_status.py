"""How podiam reads the Kubernetes API's failures, shared by every module that calls the API, so
an error reads the same in each of their log lines."""

from __future__ import annotations

import json


def status_message(body: bytes) -> str:
    """The message of a Kubernetes Status body, or the start of whatever else came back."""
    try:
        return str(json.loads(body).get("message") or "")
    except (ValueError, AttributeError):
        return body[:200].decode(errors="replace")


def describe(error: BaseException) -> str:
    """An exception as one line; some (timeouts) have no message, only a type."""
    return str(error) or type(error).__name__
