"""Which pod a token-bound request speaks for, and whether it may have its role: the join of
the token review (server/token_review.py), the registry's pods and grants, and node binding.

A token names a pod by namespace, name and uid. The pod is taken from the registry when the
watch has it with that uid and a node; otherwise (a pod asking in its first moments, before
the watch saw it or its status) it is read from the API once, so that no pod waits on the
watch. A pod that the API no longer has, or has under another uid, is gone: its token is
refused however long the token itself would live. The same policy checks as for the metadata
API follow (server/policy.py), with the caller's node compared with the pod's.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp
from kubernetes_asyncio import client

from server.pods import PodRecord, is_finished, pod_from_object
from server.policy import Denial, Grant, Reason, check_request
from server.registry import Registry
from server.token_review import ReviewedToken, TokenRefused, TokenReviewer

log = logging.getLogger(__name__)

_REQUEST_TIMEOUT = 2.0
# A pod's containers may ask before the kubelet has reported the pod's node (status.hostIP):
# wait this long for the watch to bring it, inside the agent's budget for the whole answer.
PENDING_WAIT = 1.0
_PENDING_POLL = 0.02


class TokenDenied(Exception):
    """The request is refused; ``pod`` is set when the refusal is about a pod that exists."""

    def __init__(
        self, denial: Denial, *, pod: PodRecord | None = None, unavailable: bool = False
    ) -> None:
        super().__init__(denial.message)
        self.denial = denial
        self.pod = pod
        self.unavailable = unavailable  # the answer is unknown (API down), not "no"


@dataclass(frozen=True, slots=True)
class TokenGrant:
    token: ReviewedToken
    pod: PodRecord
    grant: Grant
    from_watch: bool  # False: read from the API; its denials were not reported by the registry


class TokenPods:
    def __init__(self, reviewer: TokenReviewer, registry: Registry, api: client.ApiClient) -> None:
        self._reviewer = reviewer
        self._registry = registry
        self._core = client.CoreV1Api(api)

    async def grant(self, token: str, *, caller_ip: str | None) -> TokenGrant:
        """The pod ``token`` names and its grant, once every check passed; raises TokenDenied.
        ``caller_ip`` is the agent's node (None: node binding is off)."""
        try:
            reviewed = await self._reviewer.review(token)
        except TokenRefused as refused:
            reason = (
                Reason.TOKEN_NOT_BOUND
                if refused.kind == TokenRefused.NOT_BOUND
                else Reason.INVALID_TOKEN
            )
            raise TokenDenied(
                Denial(reason, refused.message),
                unavailable=refused.kind == TokenRefused.UNAVAILABLE,
            ) from refused
        pod, grant, from_watch = await self._find(reviewed)
        if pod is None or pod.uid != reviewed.pod_uid or is_finished(pod.phase):
            # Gone for good: forget the review too, the token can never be good again.
            self._reviewer.forget(token)
            raise TokenDenied(
                Denial(
                    Reason.POD_GONE,
                    f"the token's pod {reviewed.namespace}/{reviewed.pod_name} "
                    f"(uid {reviewed.pod_uid}) no longer exists",
                )
            )
        if not pod.host_ip:
            pod, grant = await self._wait_for_node(pod, grant)
        if not pod.host_ip:
            raise TokenDenied(
                Denial(
                    Reason.NODE_MISMATCH,
                    f"pod {pod.namespace}/{pod.name} is not running on a node yet",
                ),
                pod=pod,
                unavailable=True,
            )
        assert grant is not None
        denial = check_request(
            pod,
            grant,
            caller_ip=caller_ip,
            requested_role=None,
            resolver=self._registry.resolver,
        )
        if denial is not None:
            raise TokenDenied(denial, pod=pod)
        return TokenGrant(token=reviewed, pod=pod, grant=grant, from_watch=from_watch)

    async def _wait_for_node(
        self, pod: PodRecord, grant: Grant | None
    ) -> tuple[PodRecord, Grant | None]:
        """The pod once the watch has seen its node, or as it was after ``PENDING_WAIT``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PENDING_WAIT
        while loop.time() < deadline:
            await asyncio.sleep(_PENDING_POLL)
            seen, seen_grant = self._registry.pod(pod.namespace, pod.name)
            if seen is not None and seen.uid == pod.uid and seen.host_ip:
                return seen, seen_grant
        return pod, grant

    async def _find(self, reviewed: ReviewedToken) -> tuple[PodRecord | None, Grant | None, bool]:
        pod, grant = self._registry.pod(reviewed.namespace, reviewed.pod_name)
        if pod is not None and pod.uid == reviewed.pod_uid and pod.host_ip:
            return pod, grant, True
        # Not seen by the watch yet (or not its status): ask the API, once per request.
        obj = await self._read_pod(reviewed.namespace, reviewed.pod_name)
        if obj is None:
            return None, None, False
        pod = pod_from_object(obj)
        return pod, self._registry.decide(pod), False

    async def _read_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            response = await self._core.read_namespaced_pod(
                name, namespace, _preload_content=False, _request_timeout=_REQUEST_TIMEOUT
            )
            try:
                body = await response.read()
            finally:
                response.release()
        except client.exceptions.ApiException as error:
            if error.status == 404:
                return None
            raise self._unavailable(f"HTTP {error.status} {error.reason}") from error
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            raise self._unavailable(str(error) or type(error).__name__) from error
        if response.status == 404:
            return None
        if response.status != 200:
            raise self._unavailable(f"HTTP {response.status}")
        return json.loads(body)

    @staticmethod
    def _unavailable(why: str) -> TokenDenied:
        return TokenDenied(
            Denial(Reason.POD_GONE, f"cannot read the token's pod from the Kubernetes API: {why}"),
            unavailable=True,
        )
