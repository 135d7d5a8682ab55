"""Request path safety: the one place that decides whether a pod's request path is acceptable.

Every route in the agent — credentials, role name, the allow-listed proxy — matches on a path,
and the proxy forwards that path to the real metadata service, which holds the node's own
credentials. If the agent and the upstream service disagreed about what a path means
(``/latest/meta-data/placement/region/../../iam/security-credentials/`` read as a placement path
here and as the node's role upstream), the allow-list would be worthless. So the agent never
interprets an ambiguous path at all: it refuses it.

Work from the RAW request target. aiohttp's ``request.path`` is already percent-decoded (``%2f``
became ``/``) and ``request.rel_url`` may be normalised (``//x`` becomes ``////x``); only
``request.raw_path`` is what the client sent. It still carries the query string (and a
``#fragment`` if a client sent one), so the caller passes ``request.raw_path.partition("?")[0]``;
a ``#`` left in the path is rejected below like any other unexpected character.

The policy fails closed and never "fixes up" a path: a path is returned exactly as given or
rejected. Real SDKs (botocore, the Go, Java, JS, .NET, Ruby and PHP SDKs, the AWS CLI, ec2-metadata)
only ever send plain ASCII paths made of letters, digits and ``-_./`` plus IAM role-name
characters, so nothing a legitimate client sends is refused. What is refused, and why:

- percent-encoding of any kind. ``%2f``/``%5c`` hide separators, ``%2e`` hides dot segments,
  ``%25`` smuggles a second round of decoding, ``%c0%ae`` is an overlong UTF-8 dot. No real
  metadata path needs an escape, so the conservative allowed set of escapes is empty. (The one
  cost: instance tags whose keys need escaping cannot be read through the agent's proxy.)
- empty segments (``//`` anywhere), which some servers collapse and others do not;
- ``.`` and ``..`` segments, and any segment made only of dots (``...`` resolves to the parent on
  some platforms; no metadata path and no sensible role name is all dots);
- backslashes, which some stacks treat as separators;
- NUL, control characters, whitespace, non-ASCII (Unicode lookalikes of ``/`` and ``.`` such as
  U+FF0F, U+2215, U+2024, U+FF0E) and every ASCII character outside the set below;
- paths not starting with ``/`` (including absolute-form targets ``http://host/path``, for which
  aiohttp puts the whole URL in ``raw_path``);
- paths longer than ``MAX_PATH_LENGTH``.

The allowed characters are ``A-Z a-z 0-9 - _ . /`` (metadata paths), ``+ = , @`` (the rest of
the IAM role-name alphabet, ``[\\w+=,.@-]``) and ``:`` (MAC addresses in
``/latest/meta-data/network/interfaces/macs/<mac>/``). Notably ``;`` (path parameters in some
servers), ``?`` and ``#`` are not.

A single trailing slash is kept: in IMDS it is meaningful (``.../security-credentials/`` lists
the role, without the slash it redirects).

This module would be unnecessary if every HTTP stack agreed on one canonical form of a path; they
do not, so the agent accepts only paths that are already unambiguous.
"""

from __future__ import annotations

import functools
import re
import string

# The longest real metadata paths are ~100 characters (a MAC-address network path, or the
# credentials path with a 64-character role name). 1024 leaves ample room for anything real and
# bounds the work done on hostile input; aiohttp itself only bounds the request line at 8190.
MAX_PATH_LENGTH = 1024

_ALLOWED_CHARACTERS = frozenset(string.ascii_letters + string.digits + "-_./" + "+=,@" + ":")

# Escapes of separators and dots get their own reason (they are attacks, not accidents).
_ENCODED_SEPARATOR = re.compile(r"%(2f|5c)", re.IGNORECASE)
_ENCODED_DOT = re.compile(r"%2e", re.IGNORECASE)
_DOUBLE_ENCODING = re.compile(r"%25")


class PathRejected(Exception):
    """The request path is not acceptable. ``reason`` is a short, fixed string fit for a metric
    label; ``str(exc)`` is a message fit for the 4xx body (it never echoes the path back)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# Pods send the same few paths over and over: accepted paths are remembered (a rejection
# raises, and lru_cache never remembers those), so the hot path checks each path once.
@functools.lru_cache(maxsize=1024)
def canonical_path(raw_path: str) -> str:
    """Return ``raw_path`` if it is canonical, else raise `PathRejected`.

    ``raw_path`` is the raw request path without the query string
    (``request.raw_path.partition("?")[0]``). The result is the input itself: anything that
    would need rewriting to become canonical is refused rather than rewritten.
    """
    # Length first: it bounds the cost of every check after it.
    if len(raw_path) > MAX_PATH_LENGTH:
        raise PathRejected("too-long", f"path longer than {MAX_PATH_LENGTH} characters")
    if not raw_path.isascii():
        raise PathRejected("non-ascii", "path contains non-ASCII characters")
    if not raw_path.startswith("/"):
        raise PathRejected("not-absolute", "path must start with /")
    if "%" in raw_path:
        if _ENCODED_SEPARATOR.search(raw_path):
            raise PathRejected("encoded-separator", "path contains an encoded / or \\")
        if _ENCODED_DOT.search(raw_path):
            raise PathRejected("encoded-dot", "path contains an encoded .")
        if _DOUBLE_ENCODING.search(raw_path):
            raise PathRejected("double-encoding", "path contains an encoded %")
        raise PathRejected("percent-encoding", "path contains percent-encoding")
    if "\\" in raw_path:
        raise PathRejected("backslash", "path contains a backslash")
    if not _ALLOWED_CHARACTERS.issuperset(raw_path):
        raise PathRejected("bad-characters", "path contains characters not allowed in a path")
    segments = raw_path[1:].split("/")
    if segments[-1] == "":
        segments.pop()  # one trailing "/" is meaningful ("/" itself has no segment at all)
    for segment in segments:
        if segment == "":
            raise PathRejected("empty-segment", "path contains an empty segment (//)")
        if segment.strip(".") == "":
            raise PathRejected("dot-segment", "path contains a . or .. segment")
    return raw_path
