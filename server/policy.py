"""Who may have which role: small named checks composed into one decision that carries its
reason, so that every denial says exactly which rule said no.

Two stages. ``grant_for_pod`` runs whenever a pod or its namespace changes and decides what the
pod may have at all; ``check_request`` runs per request and adds what depends on the caller
(which node asks, which role it asks for). Both fail closed.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection
from dataclasses import dataclass

from server.arn import ArnError, RoleResolver, quoted
from server.identity import RoleIdentity
from server.pods import PERMITTED_ANNOTATION, ROLE_ANNOTATION, NamespaceRecord, PodRecord


class Reason(enum.StrEnum):
    """Why a pod is refused. The values are metric labels and Event reasons' suffixes."""

    UNKNOWN_POD = "unknown-pod"
    AMBIGUOUS_IP = "ambiguous-ip"
    NO_ROLE = "no-role"
    INVALID_ROLE = "invalid-role"
    ACCOUNT_NOT_ALLOWED = "account-not-allowed"
    UNKNOWN_NAMESPACE = "unknown-namespace"
    NO_PERMITTED = "no-permitted"
    INVALID_PERMITTED = "invalid-permitted"
    NOT_PERMITTED = "not-permitted"
    ROLE_MISMATCH = "role-mismatch"
    NODE_MISMATCH = "node-mismatch"
    # Token-bound credentials (server/token_credentials.py).
    INVALID_TOKEN = "invalid-token"
    TOKEN_NOT_BOUND = "token-not-bound"
    POD_GONE = "pod-gone"

    @property
    def event_reason(self) -> str:
        """CamelCase, as Kubernetes Event reasons are written."""
        return "Podiam" + "".join(part.capitalize() for part in self.value.split("-"))


@dataclass(frozen=True, slots=True)
class Denial:
    reason: Reason
    message: str


@dataclass(frozen=True, slots=True)
class Grant:
    """What one pod may have: an identity to assume, or the denial that explains why not."""

    role_arn: str = ""
    identity: RoleIdentity | None = None
    denial: Denial | None = None


SessionNamer = Callable[[PodRecord], str]
SessionTagger = Callable[[PodRecord], tuple[tuple[str, str], ...]]


def grant_for_pod(
    pod: PodRecord,
    namespace: NamespaceRecord | None,
    *,
    resolver: RoleResolver,
    session_name: SessionNamer,
    session_tags: SessionTagger | None = None,
    allowed_accounts: Collection[str] = (),
) -> Grant:
    """The pod-level checks, in order: has a role, the role is valid as IAM defines it, lies in
    the base ARN's account or one in ``allowed_accounts``, the namespace is known, has a usable
    ``permitted`` expression, and that expression matches the role."""
    if not pod.role:
        return Grant(denial=Denial(Reason.NO_ROLE, f"pod has no {ROLE_ANNOTATION} annotation"))
    try:
        role_arn = resolver.resolve(pod.role)
    except ArnError as error:
        return Grant(denial=Denial(Reason.INVALID_ROLE, str(error)))
    denial = _account_denial(role_arn, resolver, allowed_accounts) or _namespace_denial(
        pod, namespace, role_arn, resolver
    )
    if denial is not None:
        return Grant(role_arn=role_arn, denial=denial)
    identity = RoleIdentity(
        role_arn=role_arn,
        session_name=session_name(pod),
        external_id=pod.external_id,
        tags=session_tags(pod) if session_tags is not None else (),
    )
    return Grant(role_arn=role_arn, identity=identity)


def _account_denial(
    role_arn: str, resolver: RoleResolver, allowed_accounts: Collection[str]
) -> Denial | None:
    # However permissive a namespace's pattern, another account's roles are the operator's call
    # (--allowed-account), not a namespace admin's.
    partition, account = resolver.location(role_arn)
    if partition != resolver.partition:
        return Denial(
            Reason.ACCOUNT_NOT_ALLOWED,
            f"role {quoted(role_arn)} is in partition {partition!r}, not the server's "
            f"{resolver.partition!r}",
        )
    if account != resolver.account and account not in allowed_accounts:
        return Denial(
            Reason.ACCOUNT_NOT_ALLOWED,
            f"role {quoted(role_arn)} is in AWS account {account}, which the server does "
            "not allow (its operator lists other accounts with --allowed-account)",
        )
    return None


def _namespace_denial(
    pod: PodRecord, namespace: NamespaceRecord | None, role_arn: str, resolver: RoleResolver
) -> Denial | None:
    if namespace is None:
        return Denial(Reason.UNKNOWN_NAMESPACE, f"namespace {pod.namespace!r} is not known")
    if namespace.error:
        return Denial(Reason.INVALID_PERMITTED, f"namespace {namespace.name!r}: {namespace.error}")
    if namespace.pattern is None:
        return Denial(
            Reason.NO_PERMITTED,
            f"namespace {namespace.name!r} has no {PERMITTED_ANNOTATION} annotation",
        )
    # Matched whole (anchored on both ends), by RE2: see server/permitted.py.
    short = resolver.short_name(role_arn)
    pattern = namespace.pattern
    if (short is not None and pattern.matches(short)) or pattern.matches(role_arn):
        return None
    return Denial(
        Reason.NOT_PERMITTED,
        f"role {quoted(pod.role)} is not permitted by namespace {namespace.name!r} "
        f"({PERMITTED_ANNOTATION}={quoted(namespace.permitted)})",
    )


def check_request(
    pod: PodRecord,
    grant: Grant,
    *,
    caller_ip: str | None,
    requested_role: str | None,
    resolver: RoleResolver,
) -> Denial | None:
    """The per-request checks for a pod already found by IP: the caller runs on the pod's node
    (skipped when ``caller_ip`` is None, i.e. node binding is off), the pod has a grant, and the
    requested role (when given) is the pod's role once both are ARNs."""
    if caller_ip is not None and caller_ip != pod.host_ip:
        return Denial(
            Reason.NODE_MISMATCH,
            f"pod {pod.namespace}/{pod.name} runs on node {pod.host_ip}, not on the caller's "
            f"node {caller_ip}",
        )
    if grant.denial is not None:
        return grant.denial
    if requested_role is not None:
        try:
            requested_arn = resolver.resolve(requested_role)
        except ArnError as error:
            return Denial(Reason.ROLE_MISMATCH, f"requested role: {error}")
        if requested_arn != grant.role_arn:
            return Denial(
                Reason.ROLE_MISMATCH,
                f"requested role {requested_role!r} is not the pod's role {pod.role!r}",
            )
    return None
