"""How a handler says no: an HTTP status, a reason for the metric, a message for the pod."""

from __future__ import annotations


class Refused(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
