"""Who a projected service-account token belongs to, as the Kubernetes API says (TokenReview).

The container-credentials endpoint identifies a pod by the token it presents, not by its IP.
Only the API server can say whether a token is genuine, unexpired and bound to a live pod, so
each new token is reviewed once (``TokenReview``, audience ``podiam``) and the answer kept by
the token's hash until the token expires: SDKs present the same token on every refresh, and a
review is an API round trip. The review says which pod the token is bound to (name and uid, in
the user's extra fields); whether that pod still runs, and where, is the caller's question
(server/token_credentials.py), asked on every request, so a deleted pod's token is refused at
once even while its review is cached.

This module would be unnecessary if the server verified the tokens' signatures itself against
the cluster's OIDC keys; it would then also have to track revocation, which the API server
already does (a bound token dies with its pod).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

log = logging.getLogger(__name__)

AUDIENCE = "podiam"
POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"
_SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
# A bearer token is a few hundred bytes; anything much longer is not one of ours.
MAX_TOKEN_BYTES = 16 * 1024
# Reviews kept at most; each is a few hundred bytes. Expired ones go first.
MAX_REVIEWS = 100_000
# A refused token is refused again without asking the API for this long: a misconfigured pod
# retrying in a loop costs one TokenReview per period, not one per request.
REFUSED_SECONDS = 10.0


class TokenRefused(Exception):
    """The token cannot name a pod: ``kind`` is INVALID (not genuine, expired, wrong
    audience), NOT_BOUND (genuine but bound to no pod) or UNAVAILABLE (no answer from the API)."""

    INVALID = "invalid"
    NOT_BOUND = "not-bound"
    UNAVAILABLE = "unavailable"

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True, slots=True)
class ReviewedToken:
    """The pod a genuine token is bound to."""

    namespace: str
    service_account: str
    pod_name: str
    pod_uid: str
    expires: float  # seconds since the epoch (the token's exp claim)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT, read without checking the signature: only called once the
    API server has said the token is genuine."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
        return float(claims["exp"])
    except (ValueError, KeyError, TypeError):
        return None


class TokenReviewer:
    def __init__(
        self,
        api: client.ApiClient,
        *,
        audience: str = AUDIENCE,
        clock: Callable[[], float] = time.time,
        max_reviews: int = MAX_REVIEWS,
    ) -> None:
        self._auth = client.AuthenticationV1Api(api)
        self._audience = audience
        self._clock = clock
        self._max = max_reviews
        self._reviews: dict[str, ReviewedToken] = {}
        self._refused: dict[str, tuple[float, TokenRefused]] = {}
        # Concurrent first requests with one token share one review.
        self._pending: dict[str, asyncio.Future[ReviewedToken]] = {}

    def __len__(self) -> int:
        return len(self._reviews)

    async def review(self, token: str) -> ReviewedToken:
        if not token or len(token) > MAX_TOKEN_BYTES:
            raise TokenRefused(TokenRefused.INVALID, "no token, or not a service-account token")
        key = token_hash(token)
        known = self._reviews.get(key)
        if known is not None:
            if known.expires > self._clock():
                return known
            del self._reviews[key]
        refused = self._refused.get(key)
        if refused is not None:
            if refused[0] > self._clock():
                raise TokenRefused(refused[1].kind, refused[1].message)
            del self._refused[key]
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = asyncio.ensure_future(self._review(token))
            pending.add_done_callback(lambda _: self._pending.pop(key, None))
        try:
            reviewed = await asyncio.shield(pending)
        except TokenRefused as error:
            if error.kind != TokenRefused.UNAVAILABLE:
                if len(self._refused) >= self._max:
                    self._refused.clear()
                self._refused[key] = (self._clock() + REFUSED_SECONDS, error)
            raise
        self._remember(key, reviewed)
        return reviewed

    def forget(self, token: str) -> None:
        self._reviews.pop(token_hash(token), None)

    def _remember(self, key: str, reviewed: ReviewedToken) -> None:
        if len(self._reviews) >= self._max:
            now = self._clock()
            for stale in [k for k, r in self._reviews.items() if r.expires <= now]:
                del self._reviews[stale]
            while len(self._reviews) >= self._max:  # all live: drop the oldest reviewed
                del self._reviews[next(iter(self._reviews))]
        self._reviews[key] = reviewed

    async def _review(self, token: str) -> ReviewedToken:
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [self._audience]},
        }
        try:
            answer = await self._auth.create_token_review(body)
        except ApiException as error:
            raise TokenRefused(
                TokenRefused.UNAVAILABLE,
                f"the Kubernetes API did not review the token: HTTP {error.status} {error.reason}"
                + (" (the server needs RBAC tokenreviews: create)" if error.status == 403 else ""),
            ) from error
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            raise TokenRefused(
                TokenRefused.UNAVAILABLE, f"the Kubernetes API did not review the token: {error}"
            ) from error
        status = answer.status
        if status is None or not status.authenticated:
            why = (status.error if status is not None else "") or "not authenticated"
            raise TokenRefused(TokenRefused.INVALID, f"the token was refused: {why}")
        if self._audience not in (status.audiences or ()):
            raise TokenRefused(
                TokenRefused.INVALID, f"the token is not meant for audience {self._audience!r}"
            )
        user = status.user
        username = (user.username if user is not None else "") or ""
        extra = (user.extra if user is not None else None) or {}
        names, uids = extra.get(POD_NAME) or [], extra.get(POD_UID) or []
        if not username.startswith(_SERVICE_ACCOUNT_PREFIX) or not names or not uids:
            raise TokenRefused(
                TokenRefused.NOT_BOUND,
                "the token is not bound to a pod (use a projected service-account token)",
            )
        namespace, _, account = username[len(_SERVICE_ACCOUNT_PREFIX) :].partition(":")
        expires = token_expiry(token)
        if expires is None:
            raise TokenRefused(TokenRefused.INVALID, "the token carries no expiry")
        log.debug("token of pod %s/%s reviewed", namespace, names[0])
        return ReviewedToken(
            namespace=namespace,
            service_account=account,
            pod_name=names[0],
            pod_uid=uids[0],
            expires=expires,
        )
