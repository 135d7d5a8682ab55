"""Why one pod gets credentials, or does not: each step of the server's decision for it, as the
server sees it now, the answer the pod gets, and the one change that would make it succeed.

Without this an operator pieces the decision together from Events (which name the rule but not
the state behind it), metrics (which count, but name no pod) and log lines. The steps read the
same state the answers come from — the registry's stored grant, its IP index, the credentials
cache and the node fan-out — in the order the server applies its checks (server/policy.py,
server/service.py), so the explanation and the answer cannot disagree: a step fails exactly
where the stored grant's denial, or the lookup by IP, says no. Nothing here changes anything,
and nothing secret is shown: AccessKeyIds (as the audit trail logs them), never secret keys,
tokens or external ids.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from protos import kiam_pb2
from server.arn import ArnError, RoleResolver, quoted
from server.credentials import IdentityState
from server.identity import MIN_REMAINING, RoleIdentity, format_aws_time
from server.pods import PERMITTED_ANNOTATION, ROLE_ANNOTATION, NamespaceRecord, PodRecord
from server.policy import Grant, Reason
from server.sts import StsError


class Outcome(enum.StrEnum):
    PASS = "pass"
    FAIL = "fail"
    INFO = "info"  # a fact that decides nothing by itself
    SKIP = "skip"  # cannot be judged: an earlier step failed


@dataclass(slots=True)
class Explanation:
    steps: list[tuple[str, Outcome, str]] = field(default_factory=list)
    served: bool = False
    answer: str = ""
    fix: str = ""
    reason: str = ""

    def step(self, check: str, outcome: Outcome, detail: str) -> None:
        self.steps.append((check, outcome, detail))

    def refuse(self, reason: str, answer: str, fix: str) -> Explanation:
        self.served, self.reason, self.answer, self.fix = False, reason, answer, fix
        return self

    def message(self) -> kiam_pb2.PodExplanation:
        return kiam_pb2.PodExplanation(
            steps=[
                kiam_pb2.ExplanationStep(check=check, outcome=outcome.value, detail=detail)
                for check, outcome, detail in self.steps
            ],
            served=self.served,
            answer=self.answer,
            fix=self.fix,
            reason=self.reason,
        )


# Steps after the pod is found, in the order they are judged; those not reached are skipped.
_LATER_STEPS = (
    "active",
    "IP unique",
    "role annotation",
    "role ARN",
    "account allowed",
    "namespace known",
    "permitted pattern",
    "pattern matches",
    "node binding",
    "identity",
    "credentials cached",
    "last STS error",
)


@dataclass(frozen=True, slots=True)
class ServerView:
    """What the explanation reads: the server's own objects, read-only."""

    pod: Callable[[str, str], tuple[PodRecord | None, Grant | None]]  # Registry.pod
    pods_with_ip: Callable[[str], tuple[tuple[str, str], ...]]
    namespace: Callable[[str], NamespaceRecord | None]
    resolver: RoleResolver
    allowed_accounts: frozenset[str]
    identity_state: Callable[[RoleIdentity], IdentityState | None]  # CredentialCache.state
    streams: Callable[[str], int]  # NodeFanout.streams
    node_binding: bool
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)


def explain_pod(namespace: str, name: str, view: ServerView) -> Explanation:
    out = Explanation()
    pod, grant = view.pod(namespace, name)
    if pod is None or grant is None:
        out.step("pod found", Outcome.FAIL, f"the server's view holds no pod {namespace}/{name}")
        _skip_rest(out, "pod found")
        return out.refuse(
            Reason.UNKNOWN_POD.value,
            "no credentials: the agent answers 404 (unknown pod) for any IP this pod has",
            "check the namespace and name (kubectl get pod -n NAMESPACE NAME); a pod that has "
            "finished (Succeeded, Failed) is dropped, and one created a moment ago may not have "
            "reached the server's watch yet",
        )
    out.step(
        "pod found",
        Outcome.PASS,
        f"{pod.namespace}/{pod.name} (uid {pod.uid}), phase {pod.phase or '-'}, on node "
        f"{pod.host_ip or '(not scheduled)'}, workload {pod.workload or '-'}, service account "
        f"{pod.service_account or '-'}",
    )
    if not _active(out, pod) or not _unique(out, pod, view):
        return out
    denial = grant.denial
    if not _role(out, pod, grant, view):
        return out
    if not _namespace(out, pod, grant, view):
        return out
    if denial is not None:  # a rule above should have said so; never claim more than the grant
        out.step("grant", Outcome.FAIL, denial.message)
        return out.refuse(denial.reason.value, f"refused ({denial.reason}): {denial.message}", "")
    _node_binding(out, pod, view)
    return _credentials(out, pod, grant.identity, view)


def _skip_rest(out: Explanation, after: str) -> None:
    names = [check for check, _, _ in out.steps]
    start = _LATER_STEPS.index(after) + 1 if after in _LATER_STEPS else 0
    for check in _LATER_STEPS[start:]:
        if check not in names:
            out.step(check, Outcome.SKIP, "")


def _active(out: Explanation, pod: PodRecord) -> bool:
    if pod.host_network:
        out.step("active", Outcome.FAIL, "the pod runs on the host network: its IP is the node's")
        _skip_rest(out, "active")
        out.refuse(
            "host-network",
            "no credentials: a hostNetwork pod shares its node's IP, so no request can be told "
            "apart from the node's own; the agent never answers for it",
            "run the pod without hostNetwork: true (or give the workload IRSA or EKS Pod "
            "Identity instead)",
        )
        return False
    if not pod.ip:
        out.step("active", Outcome.FAIL, "the pod has no IP yet (status.podIP is empty)")
        _skip_rest(out, "active")
        out.refuse(
            "no-ip",
            "nothing yet: until the pod has an IP no request can come from it (its credentials "
            "are fetched ahead when it is permitted a role)",
            "wait until the pod has an IP (kubectl get pod -o wide), or see why it is not "
            "running (kubectl describe pod)",
        )
        return False
    out.step("active", Outcome.PASS, f"IP {pod.ip}, not on the host network, not finished")
    return True


def _unique(out: Explanation, pod: PodRecord, view: ServerView) -> bool:
    holders = view.pods_with_ip(pod.ip)
    others = [f"{ns}/{name}" for ns, name in holders if (ns, name) != pod.key]
    if others:
        out.step(
            "IP unique",
            Outcome.FAIL,
            f"IP {pod.ip} is also held by active pod(s) {', '.join(others)}",
        )
        _skip_rest(out, "IP unique")
        out.refuse(
            Reason.AMBIGUOUS_IP.value,
            f"refused ({Reason.AMBIGUOUS_IP}): the agent answers 403, since podiam refuses to "
            "guess which pod an IP belongs to",
            f"remove the other pod(s) on IP {pod.ip} ({', '.join(others)}), or make their "
            "status leave the IP (a pod that finished is dropped); two active pods on one IP "
            "usually mean a CNI or node problem",
        )
        return False
    out.step("IP unique", Outcome.PASS, f"no other active pod has IP {pod.ip}")
    return True


def _role(out: Explanation, pod: PodRecord, grant: Grant, view: ServerView) -> bool:
    if not pod.role:
        out.step("role annotation", Outcome.FAIL, f"the pod has no {ROLE_ANNOTATION} annotation")
        _skip_rest(out, "role annotation")
        out.refuse(
            Reason.NO_ROLE.value,
            "no role: the agent answers 404 for the role name, and SDKs find no credentials",
            f"annotate the pod (in its workload's pod template) with {ROLE_ANNOTATION}: ROLE_NAME",
        )
        return False
    out.step("role annotation", Outcome.PASS, f"{ROLE_ANNOTATION}={quoted(pod.role)}")
    resolver = view.resolver
    try:
        role_arn = resolver.resolve(pod.role)
    except ArnError as error:
        out.step("role ARN", Outcome.FAIL, str(error))
        _skip_rest(out, "role ARN")
        out.refuse(
            Reason.INVALID_ROLE.value,
            f"refused ({Reason.INVALID_ROLE}): the agent answers 403",
            f"correct the pod's {ROLE_ANNOTATION} annotation to a role short name under "
            f"{resolver.base_arn} or a full role ARN: {error}",
        )
        return False
    short = resolver.short_name(role_arn)
    where = f"short name {quoted(short)} under {resolver.base_arn}" if short else "a full ARN"
    out.step("role ARN", Outcome.PASS, f"{role_arn} ({where})")
    if grant.denial is not None and grant.denial.reason is Reason.ACCOUNT_NOT_ALLOWED:
        partition, account = resolver.location(role_arn)
        out.step("account allowed", Outcome.FAIL, grant.denial.message)
        _skip_rest(out, "account allowed")
        fix = (
            f"use a role in the server's partition {resolver.partition!r}"
            if partition != resolver.partition
            else f"the operator allows account {account} with --allowed-account {account} "
            "(chart: server.allowedAccounts), or the pod uses a role in an allowed account"
        )
        out.refuse(
            Reason.ACCOUNT_NOT_ALLOWED.value,
            f"refused ({Reason.ACCOUNT_NOT_ALLOWED}): the agent answers 403",
            fix,
        )
        return False
    allowed = sorted({resolver.account, *view.allowed_accounts})
    out.step(
        "account allowed",
        Outcome.PASS,
        f"account {resolver.location(role_arn)[1]} (allowed: {', '.join(allowed)})",
    )
    return True


def _namespace(out: Explanation, pod: PodRecord, grant: Grant, view: ServerView) -> bool:
    record = view.namespace(pod.namespace)
    reason = grant.denial.reason if grant.denial is not None else None
    if record is None or reason is Reason.UNKNOWN_NAMESPACE:
        out.step("namespace known", Outcome.FAIL, f"namespace {pod.namespace!r} is not known")
        _skip_rest(out, "namespace known")
        out.refuse(
            Reason.UNKNOWN_NAMESPACE.value,
            f"refused ({Reason.UNKNOWN_NAMESPACE}): the agent answers 403",
            "wait a moment (pods and namespaces arrive on separate watches); if it lasts, the "
            "server cannot list namespaces: check its RBAC and its log",
        )
        return False
    out.step("namespace known", Outcome.PASS, f"namespace {record.name!r}")
    annotate = f"kubectl annotate namespace {record.name} --overwrite {PERMITTED_ANNOTATION}="
    if record.error or reason is Reason.INVALID_PERMITTED:
        out.step("permitted pattern", Outcome.FAIL, record.error or grant.denial.message)
        _skip_rest(out, "permitted pattern")
        out.refuse(
            Reason.INVALID_PERMITTED.value,
            f"refused ({Reason.INVALID_PERMITTED}): the agent answers 403",
            f"rewrite the namespace's {PERMITTED_ANNOTATION} in RE2 syntax (no backreferences "
            f"or lookarounds), e.g. {annotate}'{_suggested(pod, view)}'",
        )
        return False
    if record.pattern is None or reason is Reason.NO_PERMITTED:
        out.step(
            "permitted pattern", Outcome.FAIL, f"no {PERMITTED_ANNOTATION} annotation: nothing "
            "is permitted",
        )  # fmt: skip
        _skip_rest(out, "permitted pattern")
        out.refuse(
            Reason.NO_PERMITTED.value,
            f"refused ({Reason.NO_PERMITTED}): the agent answers 403",
            f"permit the role in the namespace: {annotate}'{_suggested(pod, view)}'",
        )
        return False
    out.step(
        "permitted pattern",
        Outcome.PASS,
        f"{PERMITTED_ANNOTATION}={quoted(record.permitted)} (RE2, matched whole)",
    )
    role_arn = view.resolver.resolve(pod.role)
    short = view.resolver.short_name(role_arn)
    if reason is Reason.NOT_PERMITTED:
        tried = (
            f"matches neither short name {quoted(short)} nor ARN {quoted(role_arn)}"
            if short is not None
            else f"does not match ARN {quoted(role_arn)}"
        )
        out.step("pattern matches", Outcome.FAIL, tried)
        _skip_rest(out, "pattern matches")
        out.refuse(
            Reason.NOT_PERMITTED.value,
            f"refused ({Reason.NOT_PERMITTED}): the agent answers 403: {grant.denial.message}",
            f"give the pod a role the pattern permits, or widen the namespace's pattern to "
            f"match {quoted(short or role_arn)}, e.g. "
            f"{annotate}'{_widened(record.permitted, pod, view)}'",
        )
        return False
    matched = short if short is not None and record.pattern.matches(short) else role_arn
    out.step("pattern matches", Outcome.PASS, f"matches {quoted(matched)}")
    return True


def _suggested(pod: PodRecord, view: ServerView) -> str:
    """A pattern permitting exactly the pod's role, as the namespace would hold it."""
    role_arn = view.resolver.resolve(pod.role)
    return _re2_literal(view.resolver.short_name(role_arn) or role_arn)


def _widened(permitted: str, pod: PodRecord, view: ServerView) -> str:
    return f"{permitted}|{_suggested(pod, view)}"


def _re2_literal(text: str) -> str:
    return "".join(f"\\{c}" if c in r".+*?()[]{}|^$\\" else c for c in text)


def _node_binding(out: Explanation, pod: PodRecord, view: ServerView) -> None:
    streams = view.streams(pod.host_ip)
    connected = (
        f"{streams} node stream(s) from that node's agent to this server replica"
        if streams
        else "no node stream from that node's agent to this replica (it may follow others; "
        "with none at all it answers from its stale state or asks by unary call)"
    )
    if view.node_binding:
        detail = f"only the agent on node {pod.host_ip} is answered for this pod; {connected}"
    else:
        detail = f"off (--no-node-binding): any agent is answered for this pod; {connected}"
    out.step("node binding", Outcome.INFO, detail)


def _credentials(
    out: Explanation, pod: PodRecord, identity: RoleIdentity, view: ServerView
) -> Explanation:
    tags = ", ".join(f"{k}={v}" for k, v in identity.tags) or "none"
    external = "set (not shown)" if identity.external_id else "none"
    state = view.identity_state(identity)
    sharing = f"; held by {state.pods} pod(s)" if state is not None else ""
    out.step(
        "identity",
        Outcome.INFO,
        f"role {identity.role_arn}, session name {identity.session_name!r}, external id "
        f"{external}, session tags: {tags}{sharing}",
    )
    now = view.clock()
    error = state.last_error if state is not None else None
    failed_last = error is not None and (
        state.last_success_at is None or state.last_error_at >= state.last_success_at
    )
    creds = state.credentials if state is not None else None
    if creds is not None:
        left = creds.seconds_left(now)
        refresh = f", refresh due {format_aws_time(state.refresh_at)}" if state.refresh_at else ""
        outcome = Outcome.PASS if left > MIN_REMAINING.total_seconds() else Outcome.FAIL
        out.step(
            "credentials cached",
            outcome,
            f"AccessKeyId {creds.access_key_id}, expiring {format_aws_time(creds.expiration)} "
            f"({_minutes(left)} left){refresh}",
        )
    elif state is not None and state.fetching:
        out.step("credentials cached", Outcome.FAIL, "none yet: an AssumeRole is in flight")
    else:
        out.step("credentials cached", Outcome.FAIL, "none")
    if error is None:
        out.step("last STS error", Outcome.PASS, "none")
    else:
        since = (
            f"; succeeded since, at {format_aws_time(state.last_success_at)}"
            if not failed_last
            else ""
        )
        out.step(
            "last STS error",
            Outcome.FAIL if failed_last else Outcome.INFO,
            f"{format_aws_time(state.last_error_at)}: {error.code}: {error.message}{since}",
        )
    if creds is not None:
        out.served = True
        out.answer = (
            f"credentials for {identity.role_arn} (AccessKeyId {creds.access_key_id}, expiring "
            f"{format_aws_time(creds.expiration)}), from the agent on node {pod.host_ip}"
        )
        if creds.seconds_left(now) <= MIN_REMAINING.total_seconds():
            out.answer += f", but with only {_minutes(creds.seconds_left(now))} left"
            out.fix = _sts_fix(error, identity) if failed_last else ""
        return out
    if failed_last:
        return out.refuse(
            "sts-error",
            f"no credentials: the agent answers 503 (STS said {error.code})",
            _sts_fix(error, identity),
        )
    return out.refuse(
        "fetching",
        "nothing yet: the first AssumeRole for this identity has not finished; a request now "
        "waits for it",
        "none needed if it succeeds: ask again in a moment; if it stays so, see the server's "
        "log and podiam_sts_budget_queue (the STS rate budget)",
    )


def _sts_fix(error: StsError | None, identity: RoleIdentity) -> str:
    if error is None:
        return ""
    said = f"(STS said {error.code}: {error.message})"
    if error.code == "AccessDenied":
        tags = " and sts:TagSession (session tags are on)" if identity.tags else ""
        return (
            f"let the server assume {identity.role_arn}: the role's trust policy must allow "
            f"sts:AssumeRole{tags} for the server nodes' role (or --assume-role-arn's role), "
            f"and that role's IAM policy must allow sts:AssumeRole on it {said}"
        )
    if error.throttled:
        return (
            "STS is throttling this account: lower the server's --sts-qps, or spread other "
            f"callers; cached credentials are refreshed as soon as calls pass {said}"
        )
    if error.code in ("ValidationError", "InvalidParameterValue"):
        return f"fix what STS rejects in the request, often the session duration {said}"
    return f"fix what STS reports; the server retries with backoff {said}"


def _minutes(seconds: float) -> str:
    if seconds <= 0:
        return "none"
    if seconds < 120:
        return f"{int(seconds)}s"
    return f"{int(seconds // 60)}m"
