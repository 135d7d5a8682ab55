"""The namespace's ``iam.amazonaws.com/permitted`` pattern, matched in linear time.

Namespace admins write these patterns, and a hostile one must not be able to stall the server:
with a backtracking engine (Python's ``re``) ``(a+)+$`` against a role of 30 ``a``\\s and ``=``
holds the event loop for minutes, and every other namespace waits. RE2 (google-re2, which never
falls back to ``re``) matches in time linear in the role and in the size of the compiled
pattern, and podiam bounds both: roles are validated to IAM's lengths (server/arn.py), and the
pattern's program to ``MAX_MEMORY``. Captures are off, so a match never needs RE2's slower
submatch engines. What RE2 cannot compile (backreferences, lookarounds, a program over budget)
permits nothing, and the error says why.

If the patterns were ever matched off the event loop, the budget would matter less; it would
still keep one namespace from taking a core.
"""

from __future__ import annotations

import re2

from server.arn import quoted

# RE2's memory budget for one pattern: its program and the matcher's cache. 64 KiB takes an
# alternation of a few hundred role names; what does not fit is refused, not matched slowly.
MAX_MEMORY = 64 * 1024
# Decisions remembered per pattern: pods of one namespace mostly share a few roles.
_REMEMBER = 1024


def _options() -> re2.Options:
    options = re2.Options()
    options.max_mem = MAX_MEMORY
    options.never_capture = True
    options.log_errors = False  # the error reaches the caller (and a log line) instead
    return options


_OPTIONS = _options()


class PatternError(ValueError):
    """A pattern RE2 cannot compile; the message says why."""


class PermittedPattern:
    """A compiled ``permitted`` pattern that matches whole roles only (anchored at both ends:
    ``app-.*`` must not permit ``evil-app-x``)."""

    __slots__ = ("_decisions", "_regexp", "text")

    def __init__(self, text: str) -> None:
        try:
            self._regexp = re2.compile(text, _OPTIONS)
        except re2.error as error:
            reason = error.args[0] if error.args else error
            if isinstance(reason, bytes):
                reason = reason.decode(errors="replace")
            if "too large" in str(reason):
                reason = f"{reason} (over the {MAX_MEMORY // 1024} KiB budget of one pattern)"
            raise PatternError(f"RE2 cannot compile {quoted(text)}: {reason}") from None
        self.text = text
        self._decisions: dict[str, bool] = {}

    @property
    def engine(self) -> str:
        """Which engine matches: the module of the compiled expression (``re2``)."""
        return type(self._regexp).__module__

    def matches(self, role: str) -> bool:
        decision = self._decisions.get(role)
        if decision is None:
            decision = self._regexp.fullmatch(role) is not None
            if len(self._decisions) >= _REMEMBER:
                self._decisions.clear()
            self._decisions[role] = decision
        return decision
