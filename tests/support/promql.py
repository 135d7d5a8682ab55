"""The metric names a PromQL expression reads, for the test that keeps the dashboard and the
alerts in step with what the programs export.

A regular expression over the text would take label names, function names, keywords, label
values and durations for metrics; this reads the expression as PromQL's lexer does (strings,
numbers and durations, identifiers, brackets), then keeps the identifiers that stand where a
metric selector stands: not inside ``{...}`` (label matchers) nor the label list of ``by``,
``without``, ``on``, ``ignoring``, ``group_left`` or ``group_right``, not followed by ``(``
(functions and aggregations), not a keyword. ``{__name__="x"}`` names ``x``. Grafana's
``$variables`` are read as numbers would be: they stand for durations and intervals.
Cross-checked against Prometheus's own parser (``/api/v1/parse_query``) in
tests/test_monitoring.py when Prometheus is built.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(
    r"""
    (?P<space>\s+|\#[^\n]*)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<variable>\$\{?[A-Za-z_][A-Za-z0-9_]*(?::[A-Za-z_]+)?\}?)
  | (?P<number>(?:0x[0-9a-fA-F]+|(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)
                (?:(?:ms|s|m|h|d|w|y)(?:[0-9]+(?:ms|s|m|h|d|w|y))*)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<open>[({\[])
  | (?P<close>[)}\]])
  | (?P<op>==|!=|=~|!~|>=|<=|[-+*/%^<>=,@:])
    """,
    re.VERBOSE,
)
KEYWORDS = frozenset(
    {
        "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
        "offset", "bool", "start", "end", "inf", "nan",
    }
)  # fmt: skip
_LABEL_LISTS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})


class PromqlSyntaxError(ValueError):
    pass


def tokens(expr: str) -> list[tuple[str, str]]:
    found, position = [], 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None:
            raise PromqlSyntaxError(f"cannot read {expr[position : position + 20]!r} in {expr!r}")
        kind = match.lastgroup
        if kind != "space":
            found.append((kind, match.group()))
        position = match.end()
    return found


def metric_names(expr: str) -> set[str]:
    names: set[str] = set()
    toks = tokens(expr)
    stack: list[str] = []  # what each open bracket opened: "matchers", "labels", "call", "group"
    for index, (kind, text) in enumerate(toks):
        following = toks[index + 1] if index + 1 < len(toks) else ("", "")
        context = stack[-1] if stack else ""
        if kind == "open":
            previous = toks[index - 1] if index else ("", "")
            if text == "{":
                stack.append("matchers")
            elif text == "(" and previous[0] == "ident" and previous[1].lower() in _LABEL_LISTS:
                stack.append("labels")
            elif text == "(":
                stack.append("call" if previous[0] == "ident" else "group")
            else:
                stack.append("range")
        elif kind == "close":
            if not stack:
                raise PromqlSyntaxError(f"unbalanced {text!r} in {expr!r}")
            stack.pop()
        elif kind == "string" and context == "matchers":
            before = toks[index - 2 : index]
            if len(before) == 2 and before[0] == ("ident", "__name__") and before[1][1] == "=":
                names.add(text[1:-1])
        elif kind == "ident" and context not in ("matchers", "labels", "range"):
            if text.lower() in KEYWORDS or following == ("open", "("):
                continue  # a keyword, a function or an aggregation: sum(...)
            if following[0] == "ident" and following[1].lower() in ("by", "without"):
                continue  # an aggregation with its grouping first: sum by (le) (...)
            names.add(text)
    if stack:
        raise PromqlSyntaxError(f"unclosed {stack[-1]} in {expr!r}")
    return names
