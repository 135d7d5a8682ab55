"""Who is calling, and what they may have: the node stream's answer when it has one, else a
short wait for the stream, else the server's unary RPCs — all within one time budget, because
SDKs give the metadata service about a second.
"""

from __future__ import annotations

import asyncio
import re

import grpc

from agent import metrics
from agent.client import ServerClient
from agent.refusal import Refused
from agent.state import NodeState, PodEntry, ServedCredentials, credentials_body, role_name
from protos import REASON_METADATA

# Of the --pod-wait budget, this much (at most) is kept for the unary call after waiting on the
# stream, so the answer still arrives within the budget.
_UNARY_RESERVE = 0.3
_MIN_UNARY_TIMEOUT = 0.05
# With no node stream live, how long the role may take before the server counts as unreachable.
_ALONE_ROLE_TIMEOUT = 0.25
_NO_SERVER = "no podiam server is reachable and this pod's credentials are not cached"

# The server's refusal reasons become metric labels: accept only short fixed words.
_REASON_LABEL = re.compile(r"[a-z][a-z-]{0,31}")
_NO_ROLE = "no-role"

_REFUSAL_FOR_CODE = {
    grpc.StatusCode.NOT_FOUND: (404, "unknown-pod"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "denied"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server-timeout"),
}


class PodLookup:
    def __init__(
        self,
        state: NodeState,
        client: ServerClient,
        *,
        pod_wait: float,
        synced_once: asyncio.Event,
    ) -> None:
        self._state = state
        self._client = client
        self._pod_wait = pod_wait
        self._synced_once = synced_once

    async def entry(self, ip: str) -> PodEntry:
        """The calling pod's entry, for the role name; refuses pods without a permitted role."""
        budget = _Budget(self._pod_wait)
        entry = self._state.usable_entry(ip) or await self._from_stream(ip, budget)
        if entry is None:
            entry = await self._from_server(ip, budget)
        _check_permitted(entry)
        return entry

    def known_credentials(self, ip: str, requested: str) -> bytes | None:
        """The hot path: a pod the stream knows, asking for credentials the stream brought —
        answered without awaiting anything; None when the stream cannot answer at once."""
        served = self.known_served(ip, requested)
        return served.body if served is not None else None

    def known_served(self, ip: str, requested: str) -> ServedCredentials | None:
        """`known_credentials` with the whole pre-rendered response, for the listener."""
        state = self._state
        entry = state.usable_entry(ip)
        if entry is not None and entry.identity:
            served = state.usable_served(entry.identity)
            if served is not None:
                _check_requested(entry, requested)
                if state.stale_since is not None:
                    metrics.STALE_ANSWERS.inc()
                return served
        return None

    def known_role(self, ip: str) -> str | None:
        """The hot path of the role name: a known pod with a permitted role, else None (the
        slow path then waits for the stream or refuses, with the reason)."""
        entry = self._state.usable_entry(ip)
        if entry is None or entry.denied or not entry.role:
            return None
        return entry.role_name

    async def credentials(self, ip: str, requested: str) -> bytes:
        """The IMDS credentials document for the calling pod, if ``requested`` is its role."""
        body = self.known_credentials(ip, requested)
        if body is not None:
            return body
        budget = _Budget(self._pod_wait)
        entry = await self._from_stream(ip, budget)
        if entry is not None:
            _check_permitted(entry)
            _check_requested(entry, requested)
            body = self._state.usable_credentials(entry.identity)
            if body is not None:
                return body
        else:
            entry = await self._from_server(ip, budget)
            _check_permitted(entry)
            _check_requested(entry, requested)
        try:
            creds = await self._client.pod_credentials(
                ip, entry.role, seconds=budget.unary_timeout()
            )
        except grpc.aio.AioRpcError as error:
            raise _refusal(error) from None
        return credentials_body(creds)

    async def _from_stream(self, ip: str, budget: _Budget) -> PodEntry | None:
        if not self._synced_once.is_set():
            raise Refused(503, "not-connected", "the agent is not connected to a podiam server")
        if not self._state.live:
            return None
        arrived = await self._state.wait_ready(ip, budget.stream_wait())
        metrics.POD_WAITS.labels(outcome="arrived" if arrived else "timeout").inc()
        return self._state.usable_entry(ip) if arrived else None

    async def _from_server(self, ip: str, budget: _Budget) -> PodEntry:
        alone = not self._state.live
        if alone and self._client.unreachable():
            # No stream, and no connection to any replica: say so at once. Cached pods were
            # answered from memory before this; this one is new (or its cached entry may no
            # longer be trusted), and never gets the node's role.
            raise Refused(503, "no-server", _NO_SERVER)
        # Without a live stream a connected channel may still be one to a server that has
        # gone silent (a partition not yet noticed): the role is a small question, so a short
        # wait for it tells, and the pod hears why well inside its SDK's second.
        seconds = budget.unary_timeout()
        if alone:
            seconds = min(seconds, _ALONE_ROLE_TIMEOUT)
        try:
            role = await self._client.pod_role(ip, seconds=seconds)
        except grpc.aio.AioRpcError as error:
            if alone and error.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                raise Refused(503, "no-server", _NO_SERVER) from None
            raise _refusal(error) from None
        # The unary path has no identity key or ARN; the server checks policy on every call.
        return PodEntry(role=role, role_name=role_name(role), role_arn="", identity="", denied="")


class _Budget:
    """One request's time: a wait on the stream, then what is left for a unary call."""

    def __init__(self, seconds: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._deadline = self._loop.time() + seconds
        self._reserve = min(_UNARY_RESERVE, seconds / 3)

    def stream_wait(self) -> float:
        return max(0.0, self._deadline - self._reserve - self._loop.time())

    def unary_timeout(self) -> float:
        return max(_MIN_UNARY_TIMEOUT, self._deadline - self._loop.time())


def _check_permitted(entry: PodEntry) -> None:
    # A pod without a role is like an instance without a profile (404); one the server refuses
    # for any other reason — its role not permitted, or its IP held by several pods, whatever
    # their annotations — is refused with that reason (403). Servers that send no reason
    # (before podiam added it) leave only the role to tell the two apart.
    if entry.denied and entry.reason and entry.reason != _NO_ROLE:
        raise Refused(403, _reason_label(entry.reason), entry.denied)
    if not entry.role:
        raise Refused(404, _NO_ROLE, "this pod has no iam.amazonaws.com/role annotation")
    if entry.denied:
        raise Refused(403, _reason_label(entry.reason), entry.denied)


def _reason_label(reason: str) -> str:
    return reason if _REASON_LABEL.fullmatch(reason) else "denied"


def _check_requested(entry: PodEntry, requested: str) -> None:
    # Real IMDS answers 404 for a role that is not the instance's; so do we for the pod's.
    if requested != entry.role_name:
        raise Refused(404, "wrong-role", f"{requested!r} is not this pod's role")


def _refusal(error: grpc.aio.AioRpcError) -> Refused:
    status, reason = _REFUSAL_FOR_CODE.get(error.code(), (503, "server-unavailable"))
    if status == 403:
        # The server names the policy rule in trailing metadata, as it does on the stream.
        for key, value in error.trailing_metadata() or ():
            if key == REASON_METADATA and isinstance(value, str):
                reason = _reason_label(value)
    return Refused(status, reason, f"podiam server: {error.details() or error.code().name}")
