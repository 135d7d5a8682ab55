"""Pods asking for their credentials throughout a fault, for the loopback faults that replace
something under them (bench/fault_rotation.py the TLS files, bench/fault_rollout.py the agent
process): one load, one tally of what the pods saw around each event, and one reading of that
tally as failed requests."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence

import aiohttp

from tests.support.pods import NODE

CREDS = "/latest/meta-data/iam/security-credentials/"
_TIMEOUT = aiohttp.ClientTimeout(total=5)


def _session(ip: str, *, keepalive: bool = True) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(local_addr=(ip, 0), force_close=not keepalive)
    return aiohttp.ClientSession(connector=connector, timeout=_TIMEOUT)


class PodLoad:
    """``pods`` ((ip, role) pairs) each asking the agent on ``port`` for its role's credentials
    from its own address, 5 ms apart, until stopped; with ``mixed_connections``, every other
    pod opens a new connection per request, the rest keep theirs alive.

    ``outcomes`` counts what the pods saw: the HTTP status (``"200"``) or the error's name;
    ``reasons`` keeps the start of every answer that was not 200."""

    def __init__(
        self, port: int, pods: Sequence[tuple[str, str]], *, mixed_connections: bool = False
    ) -> None:
        self.port = port
        self.pods = list(pods)
        self.mixed_connections = mixed_connections
        self.outcomes: dict[str, int] = {}
        self.reasons: list[str] = []
        self._stop = asyncio.Event()
        self._askers: list[asyncio.Task] = []

    def start(self) -> None:
        self._askers = [
            asyncio.create_task(
                self._ask(ip, role, keepalive=not self.mixed_connections or k % 2 == 0)
            )
            for k, (ip, role) in enumerate(self.pods)
        ]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._askers, return_exceptions=True)

    def since(self, before: dict[str, int]) -> dict[str, int]:
        """The outcomes counted since ``before`` (a copy of ``outcomes`` taken then)."""
        return {s: n - before.get(s, 0) for s, n in self.outcomes.items()}

    async def _ask(self, ip: str, role: str, *, keepalive: bool) -> None:
        async with _session(ip, keepalive=keepalive) as http:
            while not self._stop.is_set():
                try:
                    async with http.get(f"http://{NODE}:{self.port}{CREDS}{role}") as r:
                        body = await r.read()
                    self._count(str(r.status))
                    if r.status != 200:
                        self.reasons.append(f"{r.status} {body[:120]!r}")
                except (aiohttp.ClientError, OSError, TimeoutError) as error:
                    self._count(type(error).__name__)
                await asyncio.sleep(0.005)

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


def failed(outcomes: dict[str, int]) -> dict[str, int]:
    """The outcomes that are failed requests: every one but a 200."""
    return {s: n for s, n in outcomes.items() if s != "200" and n}


async def served(port: int, ip: str, role: str, *, within: float) -> bool:
    """Whether the pod at ``ip`` gets its role's credentials (200) from the agent on ``port``
    within ``within`` seconds, asking every 0.05 s."""
    deadline = time.monotonic() + within
    async with _session(ip) as http:
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"http://{NODE}:{port}{CREDS}{role}") as r:
                    if r.status == 200:
                        return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
