"""The one iptables rule that sends pods' metadata traffic to the agent.

Every AWS SDK asks 169.254.169.254:80 for credentials. On an EKS node that address is the real
EC2 metadata service, which would hand every pod the node's role. The agent (hostNetwork) puts a
DNAT rule in the node's ``nat PREROUTING`` chain so that TCP traffic *arriving from pod
interfaces* (``eni+`` with the AWS VPC CNI) for that address goes to the agent instead:

    iptables -t nat -A PREROUTING -p tcp -d 169.254.169.254 --dport 80 -i eni+ \
        -j DNAT --to-destination <node-ip>:8181

DNAT rewrites only the destination, so the agent sees the pod's own IP as the client address;
that is how it tells pods apart. The node's own processes never pass PREROUTING, so they keep
reaching the real metadata service.

The rule is added only when absent (an agent restart must not stack copies) and outlives the
agent: no normal stop removes it, so while no agent listens pods get "connection refused",
never the node's role. Removal is an explicit clean-up (``podiam-agent cleanup``, with
``remove_metadata_rules``) that deletes every metadata DNAT rule pointing at the agent's port,
wherever it points. iptables is always called with ``-w`` so a lock held by kube-proxy or the CNI is
waited on rather than failed (iptables-legacy takes ``/run/xtables.lock``; iptables-nft accepts
and ignores ``-w``). This module would be unnecessary if the CNI itself redirected metadata
traffic, or if the agent ran as a sidecar with its own network namespace.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from runtime import imds

log = logging.getLogger("agent.iptables")

CAP_NET_ADMIN = 12  # bit number in /proc/<pid>/status CapEff (linux/capability.h)

_TABLE = "nat"
_CHAIN = "PREROUTING"
# A Linux interface name (at most 15 bytes, IFNAMSIZ - 1), optionally ending in iptables' "+"
# wildcard. Deliberately narrower than what the kernel allows: nothing a shell or iptables
# would read specially.
_INTERFACE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\+?|\+")
_IFNAME_MAX = 15
# Headroom beyond the lock wait for iptables itself to finish once it has the lock.
_RUN_GRACE_SECONDS = 10.0

NET_ADMIN_MESSAGE = (
    "iptables: permission denied (the agent needs the NET_ADMIN capability for --iptables)"
)


class IptablesError(Exception):
    """iptables could not be run or refused the change; the message is one line for an operator."""


@dataclass(frozen=True, slots=True)
class MetadataRedirect:
    """The DNAT rule sending pods' metadata requests to the agent at ``host:port``.

    ``interface`` is the pods' interface as iptables reads it (``eni+``, ``cali+``), or with a
    leading ``!`` every interface but one (``!docker0``). ``iptables`` is the binary to run.
    """

    host: str
    port: int
    interface: str = "eni+"
    metadata_ip: str = imds.METADATA_IP
    metadata_port: int = 80
    iptables: str = "iptables"
    # How long iptables waits for the xtables lock (``-w``) before giving up.
    lock_wait_seconds: int = 10

    def __post_init__(self) -> None:
        _require_ipv4("host", self.host)
        _require_ipv4("metadata_ip", self.metadata_ip)
        _require_port("port", self.port)
        _require_port("metadata_port", self.metadata_port)
        _split_interface(self.interface)
        if not self.iptables or any(c.isspace() for c in self.iptables):
            raise ValueError(f"iptables binary must be a command or a path, not {self.iptables!r}")
        if not isinstance(self.lock_wait_seconds, int) or self.lock_wait_seconds < 1:
            raise ValueError(
                f"lock_wait_seconds must be at least 1, not {self.lock_wait_seconds!r}"
            )

    def rule_args(self) -> list[str]:
        """The rule specification, as given after ``-A/-C/-D PREROUTING``."""
        inverted, name = _split_interface(self.interface)
        return [
            "-p", "tcp",
            "-d", self.metadata_ip,
            "--dport", str(self.metadata_port),
            *(["!"] if inverted else []), "-i", name,
            "-j", "DNAT",
            "--to-destination", f"{self.host}:{self.port}",
        ]  # fmt: skip

    async def present(self) -> bool:
        """Whether the rule is in the chain (``iptables -C``)."""
        result = await self._iptables("-C", check=False)
        if result.returncode == 0:
            return True
        # -C answers 1 with "Bad rule (does a matching rule exist in that chain?)" when absent;
        # anything else (permissions, the lock, a missing binary) is a real failure.
        if result.returncode == 1 and not _special_failure(result.stderr):
            return False
        raise _failure("-C", result)

    async def install(self) -> bool:
        """Add the rule unless it is already there; True if this call added it."""
        if await self.present():
            return False
        await self._iptables("-A")
        log.info("iptables: added %s", self.describe())
        return True

    async def remove(self) -> bool:
        """Delete every copy of the rule; True if there was at least one."""
        removed = 0
        while await self.present():
            result = await self._iptables("-D", check=False)
            # A failed -D is fine if someone else deleted that copy meanwhile; -C will say.
            if result.returncode != 0 and await self.present():
                raise _failure("-D", result)
            removed += 1
            if removed > 1000:  # -D keeps "succeeding" yet -C still finds it: do not spin
                raise IptablesError(f"iptables: could not remove {self.describe()}")
        if removed:
            log.info("iptables: removed %s (%d %s)", self.describe(), removed, _copies(removed))
        return bool(removed)

    def describe(self) -> str:
        """The rule as an operator would type it, for logs and messages."""
        return " ".join(["-t", _TABLE, "-A", _CHAIN, *self.rule_args()])

    async def _iptables(self, op: str, *, check: bool = True) -> _Result:
        argv = [self.iptables, "-w", str(self.lock_wait_seconds), "-t", _TABLE, op, _CHAIN]
        result = await _run([*argv, *self.rule_args()], self.lock_wait_seconds + _RUN_GRACE_SECONDS)
        if check and result.returncode != 0:
            raise _failure(op, result)
        return result


async def remove_metadata_rules(
    *,
    port: int,
    metadata_ip: str = imds.METADATA_IP,
    metadata_port: int = 80,
    iptables: str = "iptables",
    lock_wait_seconds: int = 10,
) -> list[str]:
    """Delete every ``nat PREROUTING`` DNAT rule for ``metadata_ip:metadata_port`` whose target
    port is ``port``, whatever the interface or node IP it names (an agent's ``--host`` or
    ``--host-interface`` may have changed since it installed its rule); the deleted rules, as
    ``iptables -S`` printed them.

    Matching on the target port rather than on one exact rule is what an operator uninstalling
    podiam expects: every copy an agent of any configuration left is gone afterwards.
    """
    _require_ipv4("metadata_ip", metadata_ip)
    _require_port("port", port)
    _require_port("metadata_port", metadata_port)
    lock = ["-w", str(lock_wait_seconds)]
    timeout = lock_wait_seconds + _RUN_GRACE_SECONDS
    listed = await _run([iptables, *lock, "-t", _TABLE, "-S", _CHAIN], timeout, output=True)
    if listed.returncode != 0:
        raise _failure("-S", listed)
    removed = []
    for line in listed.stdout.splitlines():
        spec = _metadata_dnat(line, metadata_ip, metadata_port, port)
        if spec is None:
            continue
        result = await _run([iptables, *lock, "-t", _TABLE, "-D", _CHAIN, *spec], timeout)
        # Gone meanwhile (another clean-up, an agent's own) is what was wanted.
        if result.returncode != 0 and not _missing_rule(result):
            raise _failure("-D", result)
        log.info("iptables: removed -t %s %s", _TABLE, line)
        removed.append(line)
    return removed


def _metadata_dnat(line: str, metadata_ip: str, metadata_port: int, port: int) -> list[str] | None:
    """The rule's specification (after ``-A PREROUTING``) if ``line`` is a metadata DNAT rule
    to ``port``; None for every other line."""
    try:
        words = shlex.split(line)
    except ValueError:
        return None
    if words[:2] != ["-A", _CHAIN]:
        return None
    spec = words[2:]

    def value(option: str) -> str | None:
        return spec[spec.index(option) + 1] if option in spec[:-1] else None

    destination = value("-d")
    target = value("--to-destination") or ""
    if (
        value("-j") != "DNAT"
        or value("-p") != "tcp"
        or destination not in (metadata_ip, f"{metadata_ip}/32")
        or value("--dport") != str(metadata_port)
        or target.rpartition(":")[2] != str(port)
        or "!" in spec[max(0, spec.index("-d") - 1) : spec.index("-d")]
    ):
        return None
    return spec


def _missing_rule(result: _Result) -> bool:
    text = result.stderr.lower()
    return result.returncode == 1 and ("does a matching rule exist" in text or "bad rule" in text)


async def check_can_manage(*, iptables: str = "iptables", lock_wait_seconds: int = 5) -> None:
    """Raise IptablesError unless ``iptables`` runs here and may change the nat table.

    Lists ``nat PREROUTING`` (which needs the same privilege as changing it) so that a missing
    binary or capability is reported at start-up, not when the first pod asks.
    """
    argv = [iptables, "-w", str(lock_wait_seconds), "-t", _TABLE, "-S", _CHAIN]
    result = await _run(argv, lock_wait_seconds + _RUN_GRACE_SECONDS)
    if result.returncode == 0:
        return
    if has_capability(CAP_NET_ADMIN) is False:
        # Whatever iptables said, this is the cause an operator can fix.
        raise IptablesError(NET_ADMIN_MESSAGE)
    raise _failure("-S", result)


def has_capability(bit: int, *, status: Path = Path("/proc/self/status")) -> bool | None:
    """Whether this process holds capability ``bit`` in its effective set; None if unknown."""
    try:
        text = status.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return None


@dataclass(frozen=True, slots=True)
class _Result:
    returncode: int
    stderr: str
    stdout: str = ""


async def _run(
    argv: list[str],
    timeout: float,  # noqa: ASYNC109 - a hard cap on a child
    *,
    output: bool = False,
) -> _Result:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if output else asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError:
        raise IptablesError(f"iptables not found ({argv[0]!r} is not on PATH)") from None
    except PermissionError:
        raise IptablesError(f"iptables: {argv[0]!r} is not executable") from None
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise IptablesError(f"iptables: {argv[0]} did not finish within {timeout:g}s") from None
    return _Result(
        proc.returncode or 0,
        stderr.decode(errors="replace"),
        (stdout or b"").decode(errors="replace"),
    )


def _special_failure(stderr: str) -> str | None:
    """The operator-facing message for failures that are not about the rule itself."""
    text = stderr.lower()
    if "permission denied" in text or "you must be root" in text or "not permitted" in text:
        return NET_ADMIN_MESSAGE
    if "xtables lock" in text:
        return "iptables: gave up waiting for the xtables lock (another program is holding it)"
    return None


def _failure(op: str, result: _Result) -> IptablesError:
    special = _special_failure(result.stderr)
    if special:
        return IptablesError(special)
    # iptables-nft prefixes some answers with "# Warning: ..." lines; the error is elsewhere.
    lines = [s for s in (ln.strip() for ln in result.stderr.splitlines()) if s]
    detail = next((s for s in reversed(lines) if not s.startswith("#")), "no error message")
    return IptablesError(f"iptables {op} failed (exit {result.returncode}): {detail}")


def _split_interface(interface: str) -> tuple[bool, str]:
    """``"eni+"`` → ``(False, "eni+")``; ``"!docker0"``, ``"! docker0"`` → ``(True, "docker0")``."""
    if not isinstance(interface, str):
        raise ValueError(f"interface must be a string, not {interface!r}")
    inverted = interface.startswith("!")
    name = interface[1:].lstrip(" ") if inverted else interface
    if not name or len(name) > _IFNAME_MAX or not _INTERFACE.fullmatch(name):
        raise ValueError(
            f"interface must be an interface name of at most {_IFNAME_MAX} characters "
            f"(letters, digits, '_', '.', '-'; not starting with '.' or '-'), optionally ending "
            f"in '+' and optionally "
            f"preceded by '!', not {interface!r}"
        )
    return inverted, name


def _require_ipv4(field: str, value: str) -> None:
    try:
        ipaddress.IPv4Address(value)
    except (ipaddress.AddressValueError, TypeError):
        raise ValueError(f"{field} must be an IPv4 address, not {value!r}") from None


def _require_port(field: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"{field} must be a port number from 1 to 65535, not {value!r}")


def _copies(n: int) -> str:
    return "copy" if n == 1 else "copies"
