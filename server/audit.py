"""The audit trail: from a CloudTrail event's ``accessKeyId`` back to the pods that held it.

When replicas share one STS session (server/sessions.py), the session name no longer names a
pod, and CloudTrail alone cannot say which pod made a call. Two kinds of record close the gap:

- ``credentials``: every credential set obtained from STS, once — identity key, role ARN,
  session name, session tags, AccessKeyId, expiration. Never the secret or the token.
- ``pod``: every pod the first time it is served an identity — namespace, pod, uid, node,
  identity key and the AccessKeyId it was handed first. Later refreshes of that identity are
  ``credentials`` records with the same identity key, so a later AccessKeyId leads to the pods
  through the key.

Records go through logging, as one line each (JSON fields with ``--json-log``), to the process
log or, with ``--audit-log FILE``, as JSON lines to a file of their own (reopened when log
rotation moves it). They are written whatever ``--log-level`` says.
"""

from __future__ import annotations

import logging
import logging.handlers
from collections.abc import Callable
from pathlib import Path

from runtime.logs import JsonFormatter
from server.identity import AwsCredentials, RoleIdentity, format_aws_time
from server.pods import PodRecord

STDOUT = "-"  # --audit-log value: with the other log lines
_LOGGER = "podiam.audit"


class AuditTrail:
    def __init__(
        self,
        destination: str = STDOUT,
        *,
        on_first_served: Callable[[PodRecord], None] | None = None,
    ) -> None:
        self._on_first_served = on_first_served
        self._handler: logging.Handler | None = None
        if destination == STDOUT:
            self._log = logging.getLogger(_LOGGER)
        else:
            # A file of its own: JSON lines, whatever the process log's format.
            self._log = logging.getLogger(f"{_LOGGER}.file")
            self._log.propagate = False
            self._handler = logging.handlers.WatchedFileHandler(Path(destination))
            self._handler.setFormatter(JsonFormatter())
            self._log.addHandler(self._handler)
        # Written whatever --log-level says: the audit is not chatter.
        self._log.setLevel(logging.INFO)
        # Pod uid → the identity key it was last recorded with: the one record per pod. The uid
        # string is the PodRecord's own, so this costs one dictionary slot per pod.
        self._served: dict[str, str] = {}

    def credentials_obtained(self, identity: RoleIdentity, credentials: AwsCredentials) -> None:
        tags = dict(identity.tags)
        self._log.info(
            "audit: credentials obtained: identity=%s role=%s session=%s access_key_id=%s "
            "expiration=%s tags=%s",
            identity.key,
            identity.role_arn,
            identity.session_name,
            credentials.access_key_id,
            format_aws_time(credentials.expiration),
            ",".join(f"{k}={v}" for k, v in identity.tags) or "-",
            extra={
                "audit": "credentials",
                "identity": identity.key,
                "role_arn": identity.role_arn,
                "session_name": identity.session_name,
                "session_tags": tags,
                "access_key_id": credentials.access_key_id,
                "expiration": format_aws_time(credentials.expiration),
            },
        )

    def pod_served(self, pod: PodRecord, identity: RoleIdentity, access_key_id: str) -> None:
        """Record ``pod`` as served ``identity``, unless it already was."""
        if self._served.get(pod.uid) == identity.key:
            return
        if pod.uid not in self._served and self._on_first_served is not None:
            self._on_first_served(pod)
        self._served[pod.uid] = identity.key
        self._log.info(
            "audit: pod served: %s/%s uid=%s node=%s identity=%s access_key_id=%s",
            pod.namespace,
            pod.name,
            pod.uid,
            pod.host_ip,
            identity.key,
            access_key_id,
            extra={
                "audit": "pod",
                "namespace": pod.namespace,
                "pod": pod.name,
                "uid": pod.uid,
                "node": pod.host_ip,
                "identity": identity.key,
                "role_arn": identity.role_arn,
                "access_key_id": access_key_id,
            },
        )

    def recorded(self, pod: PodRecord, identity: RoleIdentity) -> bool:
        """Whether ``pod`` was recorded as served ``identity`` already (then ``pod_served``
        would write nothing)."""
        return self._served.get(pod.uid) == identity.key

    def pod_gone(self, pod: PodRecord) -> None:
        self._served.pop(pod.uid, None)

    def close(self) -> None:
        if self._handler is not None:
            self._log.removeHandler(self._handler)
            self._handler.close()
            self._handler = None
