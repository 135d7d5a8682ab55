"""Cut connections to the metadata address that were opened before the DNAT rule.

iptables NAT is decided once per connection, on its first packet, and remembered in the
connection-tracking table. A pod that opened a keep-alive connection to 169.254.169.254 before
the agent's rule existed (a node booting, a clean-up followed by a reinstall) would keep talking
to the real metadata service over it — the node's role — for as long as it keeps the connection.
Deleting those conntrack entries makes the connection's next packet a new flow: NAT is decided
again, the packet is DNATed to the agent, whose kernel knows no such connection and answers with
a reset. The SDK sees a connection error and reconnects, to the agent this time.

This runs the ``conntrack`` tool (Debian's package of that name) rather than speaking netlink
itself: one call at start-up does not justify a netlink library, and the tool's own output is
what an operator would run by hand to check. It would be unnecessary if the rule were installed
before any pod could run (a node bootstrap step), which podiam cannot count on.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import shutil

from runtime import imds

log = logging.getLogger("agent.conntrack")

_DELETED = re.compile(r"(\d+) flow entries have been deleted")
_TIMEOUT_SECONDS = 10.0


class ConntrackError(Exception):
    """conntrack could not be run or failed; the message is one line for an operator."""


def check_available(conntrack: str = "conntrack") -> None:
    """Raise ConntrackError unless ``conntrack`` can be run: checked before the rule is
    installed, so a missing tool changes nothing on the node."""
    if shutil.which(conntrack) is None:
        raise ConntrackError(_missing(conntrack))


def _missing(conntrack: str) -> str:
    return (
        f"conntrack not found ({conntrack!r} is not on PATH or not executable; it is needed "
        "with --iptables to cut connections opened to the metadata service before the rule)"
    )


async def cut_metadata_connections(
    *, ip: str = imds.METADATA_IP, port: int = 80, conntrack: str = "conntrack"
) -> int:
    """Delete the tracked TCP connections to ``ip:port`` that were not DNATed; how many.

    Only connections whose replies still come from ``ip:port`` itself — the real metadata
    service. Those already DNATed to an agent (replies from the node's IP) are left alone: in
    an upgrade they are the other agent's live connections, and deleting their entries would
    cut them (their next packets lose the reverse translation). ``conntrack -D`` exits 1 when
    nothing matched, which is the usual, good case.
    """
    ipaddress.IPv4Address(ip)
    argv = [
        conntrack, "-D", "-p", "tcp",
        "--orig-dst", ip, "--orig-port-dst", str(port),
        "--reply-src", ip, "--reply-port-src", str(port),
    ]  # fmt: skip
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError:
        raise ConntrackError(_missing(conntrack)) from None
    except PermissionError:
        raise ConntrackError(f"conntrack: {conntrack!r} is not executable") from None
    try:
        _, raw = await asyncio.wait_for(proc.communicate(), _TIMEOUT_SECONDS)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise ConntrackError(f"conntrack did not finish within {_TIMEOUT_SECONDS:g}s") from None
    stderr = raw.decode(errors="replace")
    found = _DELETED.search(stderr)
    deleted = int(found.group(1)) if found else 0
    if proc.returncode == 0 or (proc.returncode == 1 and found is not None):
        if deleted:
            log.info(
                "conntrack: cut %d connection(s) opened to %s:%d before the DNAT rule",
                deleted,
                ip,
                port,
            )
        return deleted
    lines = [s for s in (ln.strip() for ln in stderr.splitlines()) if s]
    detail = lines[-1] if lines else "no error message"
    if "operation not permitted" in stderr.lower():
        detail = "permission denied (needs NET_ADMIN)"
    raise ConntrackError(f"conntrack -D failed (exit {proc.returncode}): {detail}")
