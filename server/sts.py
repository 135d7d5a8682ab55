"""The gateway to AWS STS: one AssumeRole call, turned into `AwsCredentials` or a `StsError`.

boto3 is synchronous, so every call runs in a small, bounded thread pool off the event loop; the
STS client is built once (botocore clients are thread-safe) and reused by every thread. Nothing
here caches or retries, and botocore is told not to retry either (one attempt per call): every
request that reaches STS must first take a token from the rate budget (server/sts_budget.py), so
the credentials cache in front of this module makes each attempt itself, through the budget, and
decides when to call again (``StsError.retryable``).

With `assume_role_arn` the server first becomes an intermediate role and calls AssumeRole for
pods with *its* credentials (useful when the node's instance role may only assume that one role).
botocore's refreshable-credentials machinery renews the intermediate credentials before they
expire, exactly as it does for an `assume_role` profile, so no timer lives here.

If aiobotocore were a dependency, the thread pool would be unnecessary.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import botocore.session
from botocore.config import Config
from botocore.credentials import (
    CredentialProvider,
    CredentialResolver,
    DeferredRefreshableCredentials,
)
from botocore.exceptions import BotoCoreError, ClientError

from server.audit import AuditTrail
from server.identity import AwsCredentials, RoleIdentity, format_aws_time
from server.metrics import STS_CALLS, STS_ERRORS, STS_SECONDS

log = logging.getLogger(__name__)

DEFAULT_SESSION_DURATION = timedelta(hours=1)
# STS limits on RoleSessionName: 2-64 characters of [\w+=,.@-].
SESSION_NAME_MAX = 64
_SESSION_NAME_FORBIDDEN = re.compile(r"[^\w+=,.@-]", re.ASCII)
# The intermediate role's own session (role chaining caps every chained session at one hour).
INTERMEDIATE_SESSION_PREFIX = "podiam-server"
INTERMEDIATE_SESSION_DURATION = timedelta(hours=1)

# Short timeouts: a pod's SDK waits about a second for the metadata service, and the cache
# retries with backoff anyway. One attempt per call: botocore's own retries would reach STS
# behind the rate budget's back (its `max_attempts: 3` meant four attempts — the key counts
# retries — so four times what the budget allowed while STS throttles); the cache retries
# through the budget instead. `total_max_attempts` counts attempts, the first included.
_BOTO_CONFIG = Config(
    connect_timeout=3,
    read_timeout=10,
    retries={"mode": "standard", "total_max_attempts": 1},
    user_agent_extra="podiam",
)


def session_name_for(prefix: str, suffix: str) -> str:
    """`<prefix>-<suffix>` as a valid RoleSessionName: forbidden characters become `-`, and the
    result is cut to STS's 64-character limit."""
    return sanitised_session_name(f"{prefix}-{suffix}")


def sanitised_session_name(name: str) -> str:
    return _SESSION_NAME_FORBIDDEN.sub("-", name)[:SESSION_NAME_MAX]


# Answers that mean "too many requests": back off, the request itself was fine.
THROTTLING_CODES = frozenset(
    {"Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException"}
)


# Answers and failures worth another attempt (what botocore's standard mode retried): STS or the
# way to it failed for a moment; the request itself may well succeed.
TRANSIENT_CODES = frozenset(
    {
        "InternalFailure",
        "InternalError",
        "ServiceUnavailable",
        "RequestTimeout",
        "RequestTimeoutException",
        "IDPCommunicationError",
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        "ProxyConnectionError",
        "HTTPClientError",
    }
)


class StsError(Exception):
    """An AssumeRole call that failed. `code` is the AWS error code (`AccessDenied`, ...) or, for
    failures that never reached STS, the botocore exception's class name
    (`EndpointConnectionError`, `ReadTimeoutError`, ...)."""

    def __init__(self, code: str, message: str, *, role_arn: str = "") -> None:
        self.code = code
        self.message = " ".join(message.split())  # one line, whatever STS sent
        self.role_arn = role_arn
        super().__init__(code, self.message)

    @property
    def throttled(self) -> bool:
        return self.code in THROTTLING_CODES

    @property
    def retryable(self) -> bool:
        """Whether the same call may succeed if made again soon (throttling, a 5xx, a failed
        connection); AccessDenied and alike will not."""
        return self.throttled or self.code in TRANSIENT_CODES

    def __str__(self) -> str:
        target = f" for {self.role_arn}" if self.role_arn else ""
        return f"STS AssumeRole{target} failed: {self.code}: {self.message}"


def _whole_seconds_utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).replace(microsecond=0)


class _FixedCredentialProvider(CredentialProvider):
    """Hands one credentials object to a botocore session, so that no other source (environment,
    files, instance metadata) can be picked up instead."""

    METHOD = "podiam-intermediate-role"
    CANONICAL_NAME = "podiam-intermediate-role"

    def __init__(self, credentials: DeferredRefreshableCredentials) -> None:
        super().__init__()
        self._credentials = credentials

    def load(self) -> DeferredRefreshableCredentials:
        return self._credentials


class StsGateway:
    def __init__(
        self,
        *,
        region: str | None,
        endpoint_url: str | None = None,
        assume_role_arn: str | None = None,
        session_duration: timedelta = DEFAULT_SESSION_DURATION,
        max_workers: int = 8,
        boto_session: boto3.Session | None = None,
        audit: AuditTrail | None = None,
        transitive_tags: bool = False,
    ) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self._duration_seconds = int(session_duration.total_seconds())
        self._region = region
        self._endpoint_url = endpoint_url
        self._config = _BOTO_CONFIG.merge(Config(max_pool_connections=max_workers))
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="sts")
        self._closed = False
        self._audit = audit
        self._transitive_tags = transitive_tags

        # Current botocore already defaults `sts_regional_endpoints` to "regional"; say so
        # explicitly in the sessions built here, so an inherited AWS_STS_REGIONAL_ENDPOINTS=legacy
        # cannot send us to the global endpoint. A session passed in is used as configured.
        session = boto_session or boto3.Session(botocore_session=self._botocore_session())
        base_client = self._client(session, self._region)
        if assume_role_arn:
            # The same region as the base client, wherever that one found it.
            self._client_for_pods = self._client(
                self._intermediate_session(base_client, assume_role_arn),
                base_client.meta.region_name,
            )
        else:
            self._client_for_pods = base_client
        if self._client_for_pods.meta.region_name in (None, "aws-global") and not endpoint_url:
            log.warning("no AWS region configured: using the global STS endpoint")
        if assume_role_arn and session_duration > INTERMEDIATE_SESSION_DURATION:
            log.warning(
                "sessions assumed through an intermediate role are limited to %s by AWS "
                "(role chaining); AssumeRole with %s will fail",
                INTERMEDIATE_SESSION_DURATION,
                session_duration,
            )
        log.info(
            "STS gateway using %s%s",
            self._client_for_pods.meta.endpoint_url,
            f" through intermediate role {assume_role_arn}" if assume_role_arn else "",
        )

    @staticmethod
    def _botocore_session() -> botocore.session.Session:
        session = botocore.session.get_session()
        session.set_config_variable("sts_regional_endpoints", "regional")
        return session

    def _client(self, session: boto3.Session, region: str | None) -> Any:
        return session.client(
            "sts",
            region_name=region,
            endpoint_url=self._endpoint_url,
            config=self._config,
        )

    def _intermediate_session(self, base_client: Any, role_arn: str) -> boto3.Session:
        session_name = session_name_for(INTERMEDIATE_SESSION_PREFIX, socket.gethostname())

        def refresh() -> dict[str, str]:
            # Called by botocore (in whichever worker thread signs a request) on first use and
            # again when the credentials come within its refresh window of expiry.
            log.info("assuming intermediate role %s", role_arn)
            try:
                response = base_client.assume_role(
                    RoleArn=role_arn,
                    RoleSessionName=session_name,
                    DurationSeconds=int(INTERMEDIATE_SESSION_DURATION.total_seconds()),
                )
            except (ClientError, BotoCoreError) as exc:
                error = self._error(exc, role_arn)
                log.warning("intermediate AssumeRole for %s failed: %s", role_arn, error.code)
                raise error from exc
            creds = response["Credentials"]
            return {
                "access_key": creds["AccessKeyId"],
                "secret_key": creds["SecretAccessKey"],
                "token": creds["SessionToken"],
                "expiry_time": _whole_seconds_utc(creds["Expiration"]).isoformat(),
            }

        credentials = DeferredRefreshableCredentials(refresh_using=refresh, method="assume-role")
        chained = self._botocore_session()
        chained.register_component(
            "credential_provider",
            CredentialResolver(providers=[_FixedCredentialProvider(credentials)]),
        )
        return boto3.Session(botocore_session=chained)

    async def assume_role(self, identity: RoleIdentity) -> AwsCredentials:
        if self._closed:
            raise StsError("GatewayClosed", "the STS gateway is shut down", role_arn="")
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            result = await loop.run_in_executor(self._executor, self._assume_role_sync, identity)
        finally:
            STS_SECONDS.observe(time.perf_counter() - started)
        if isinstance(result, StsError):
            STS_CALLS.labels(outcome=result.code).inc()
            STS_ERRORS.labels(code=result.code).inc()
            log.warning("AssumeRole for %s failed: %s", identity.role_arn, result.code)
            raise result
        STS_CALLS.labels(outcome="success").inc()
        if self._audit is not None:
            self._audit.credentials_obtained(identity, result)
        log.debug(
            "assumed %s as %s until %s",
            identity.role_arn,
            identity.session_name,
            format_aws_time(result.expiration),
        )
        return result

    def _assume_role_sync(self, identity: RoleIdentity) -> AwsCredentials | StsError:
        # Runs in a worker thread. Errors are returned, not raised, so the traceback (and the
        # frames holding request data) stays in this thread.
        kwargs: dict[str, Any] = {
            "RoleArn": identity.role_arn,
            "RoleSessionName": identity.session_name,
            "DurationSeconds": self._duration_seconds,
        }
        if identity.external_id:
            kwargs["ExternalId"] = identity.external_id
        if identity.tags:
            # Needs sts:TagSession in the role's trust policy, besides sts:AssumeRole.
            kwargs["Tags"] = [{"Key": key, "Value": value} for key, value in identity.tags]
            if self._transitive_tags:
                kwargs["TransitiveTagKeys"] = [key for key, _ in identity.tags]
        try:
            response = self._client_for_pods.assume_role(**kwargs)
        except StsError as exc:  # the intermediate role could not be assumed
            return exc
        except (ClientError, BotoCoreError) as exc:
            return self._error(exc, identity.role_arn)
        try:
            creds = response["Credentials"]
            return AwsCredentials(
                access_key_id=creds["AccessKeyId"],
                secret_access_key=creds["SecretAccessKey"],
                token=creds["SessionToken"],
                expiration=_whole_seconds_utc(creds["Expiration"]),
                last_updated=_whole_seconds_utc(datetime.now(UTC)),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            return StsError(
                "MalformedResponse",
                f"no {exc} in the AssumeRole answer",
                role_arn=identity.role_arn,
            )

    @staticmethod
    def _error(exc: ClientError | BotoCoreError, role_arn: str) -> StsError:
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            return StsError(
                error.get("Code") or "Unknown",
                error.get("Message") or str(exc),
                role_arn=role_arn,
            )
        # botocore's own messages name the endpoint and the failure, never credentials.
        return StsError(type(exc).__name__, str(exc), role_arn=role_arn)

    def close(self) -> None:
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
