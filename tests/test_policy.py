"""The policy matrix: which pod may have which role, and why not."""

from __future__ import annotations

import pytest

from server.arn import RoleResolver
from server.pods import namespace_from_object, pod_from_object
from server.policy import Reason, check_request, grant_for_pod
from tests.support.objects import namespace_object, pod_object

BASE = "arn:aws:iam::123456789012:role/"
OTHER_ACCOUNT = "999999999999"  # listed with --allowed-account unless a test says otherwise
resolver = RoleResolver(BASE)


def decide(
    role: str | None,
    permitted: str | None,
    *,
    namespace_known: bool = True,
    allowed_accounts: frozenset[str] = frozenset({OTHER_ACCOUNT}),
):
    pod = pod_from_object(pod_object("team", "app", role=role))
    namespace = namespace_from_object(namespace_object("team", permitted=permitted))
    return grant_for_pod(
        pod,
        namespace if namespace_known else None,
        resolver=resolver,
        session_name=lambda p: f"podiam-{p.name}",
        allowed_accounts=allowed_accounts,
    )


@pytest.mark.parametrize(
    ("role", "permitted"),
    [
        ("app-reader", "app-.*"),
        ("app-reader", "app-reader|other"),
        (BASE + "app-reader", "app-.*"),  # full ARN under the base: short name matches
        (BASE + "app-reader", r"arn:aws:iam::123456789012:role/app-.*"),  # matched as full ARN
        ("arn:aws:iam::999999999999:role/cross", r"arn:aws:iam::999999999999:role/.*"),
        ("team/app-reader", "team/.*"),  # a role with a path under the base ARN
        ("/app-reader", "app-reader"),  # kiam's leading slash form
        ("app-reader", ".*"),
    ],
)
def test_permitted_roles_are_granted_with_their_arn(role, permitted):
    grant = decide(role, permitted)
    assert grant.denial is None
    assert grant.identity is not None
    assert grant.identity.role_arn.startswith("arn:aws:iam::")
    assert grant.identity.role_arn.endswith(role.rsplit("/", 1)[-1])
    assert grant.identity.session_name == "podiam-app"


@pytest.mark.parametrize(
    ("role", "permitted", "reason"),
    [
        ("evil-app-x", "app-.*", Reason.NOT_PERMITTED),  # anchored at the start
        ("app-x-evil", "app-x", Reason.NOT_PERMITTED),  # anchored at the end
        ("app-reader", "", Reason.NO_PERMITTED),
        ("app-reader", None, Reason.NO_PERMITTED),
        ("app-reader", "   ", Reason.NO_PERMITTED),
        ("app-reader", "app-(", Reason.INVALID_PERMITTED),
        # a cross-account ARN (account listed) is never matched as a short name
        ("arn:aws:iam::999999999999:role/app-reader", "app-.*", Reason.NOT_PERMITTED),
        # a short-name regex cannot be satisfied by a lookalike in another account
        ("arn:aws:iam::999999999999:role/app-reader", "app-reader", Reason.NOT_PERMITTED),
        (None, ".*", Reason.NO_ROLE),
        ("", ".*", Reason.NO_ROLE),
        ("arn:aws:s3:::bucket", ".*", Reason.INVALID_ROLE),
        ("bad role name!", ".*", Reason.INVALID_ROLE),
    ],
)
def test_roles_outside_the_namespace_policy_are_denied_with_the_reason(role, permitted, reason):
    grant = decide(role, permitted)
    assert grant.identity is None
    assert grant.denial is not None
    assert grant.denial.reason is reason
    assert grant.denial.message


@pytest.mark.parametrize(
    "role",
    [
        "app-x/../admin",
        "app-x/./admin",
        "../admin",
        "app-x//admin",
        BASE + "app-x/../admin",
        BASE + "app-x//admin",
        "a" * 65,
        "team/" + "p/" * 260 + "reader",  # a path over IAM's 512 characters
    ],
)
def test_role_with_dot_dot_segment_is_refused_not_served_as_another_role(role):
    grant = decide(role, ".*")
    assert grant.identity is None and grant.role_arn == ""
    assert grant.denial.reason is Reason.INVALID_ROLE


def test_dot_dot_refusal_says_why():
    message = decide("app-x/../admin", "app-.*").denial.message
    assert "'..'" in message and "not allowed" in message


@pytest.mark.parametrize(
    "role",
    [
        "arn:aws:iam::999999999999:role/anything",
        "arn:aws:iam::999999999999:role/team/anything",
        "arn:aws-cn:iam::123456789012:role/anything",  # the base account, another partition
    ],
)
def test_role_in_unlisted_account_is_refused_even_when_pattern_permits_everything(role):
    grant = decide(role, ".*", allowed_accounts=frozenset())
    assert grant.identity is None
    assert grant.denial.reason is Reason.ACCOUNT_NOT_ALLOWED
    assert "--allowed-account" in grant.denial.message or "partition" in grant.denial.message


def test_role_in_listed_account_is_granted_when_the_pattern_matches_its_arn():
    role = "arn:aws:iam::999999999999:role/reader"
    granted = decide(role, r"arn:aws:iam::999999999999:role/.*")
    assert granted.identity is not None and granted.identity.role_arn == role
    assert decide(role, "reader").denial.reason is Reason.NOT_PERMITTED


def test_roles_in_the_base_account_need_no_listing():
    grant = decide(BASE + "reader", ".*", allowed_accounts=frozenset())
    assert grant.identity is not None


@pytest.mark.parametrize("pattern", [r"(app)-\1", r"app-(?=x).*", r"(?<!evil-)app-.*", r"app\Z"])
def test_pattern_re2_cannot_compile_permits_nothing_and_says_why(pattern):
    grant = decide("app-x", pattern)
    assert grant.identity is None
    assert grant.denial.reason is Reason.INVALID_PERMITTED
    assert "RE2 cannot compile" in grant.denial.message


def test_pattern_over_the_re2_budget_permits_nothing():
    grant = decide("app-x", "|".join(f"app-{n:05d}-with-a-long-role-name" for n in range(5000)))
    assert grant.denial.reason is Reason.INVALID_PERMITTED
    assert "KiB" in grant.denial.message


def test_pathological_pattern_is_matched_by_re2_and_decides():
    # With a backtracking engine this decision takes longer than the age of the universe
    # (2^500 paths); RE2 matches in time linear in the role, so the test ends at all.
    record = namespace_from_object(namespace_object("team", permitted="(a+)+$"))
    assert record.pattern.engine == "re2"
    role = "a" * 435 + "/" + "a" * 63 + "="  # 500 characters, a valid IAM path and name
    assert len(role) == 500
    assert decide(role, "(a+)+$").denial.reason is Reason.NOT_PERMITTED
    assert decide("a" * 30, "(a+)+$").denial is None


def test_pod_in_unknown_namespace_is_denied():
    grant = decide("app-reader", ".*", namespace_known=False)
    assert grant.denial.reason is Reason.UNKNOWN_NAMESPACE


def test_external_id_is_part_of_the_identity():
    annotations = {"iam.amazonaws.com/external-id": "ext-1"}
    pod = pod_from_object(pod_object("team", "app", role="r", annotations=annotations))
    grant = grant_for_pod(
        pod,
        namespace_from_object(namespace_object("team", permitted=".*")),
        resolver=resolver,
        session_name=lambda p: "s",
    )
    assert grant.identity.external_id == "ext-1"


def _permitted_pod(role="app-reader", host_ip="10.0.0.1"):
    pod = pod_from_object(pod_object("team", "app", role=role, host_ip=host_ip))
    grant = grant_for_pod(
        pod,
        namespace_from_object(namespace_object("team", permitted=".*")),
        resolver=resolver,
        session_name=lambda p: "s",
    )
    return pod, grant


@pytest.mark.parametrize("requested", ["app-reader", BASE + "app-reader", "/app-reader"])
def test_requested_role_matches_after_both_resolve_to_arns(requested):
    pod, grant = _permitted_pod()
    assert (
        check_request(pod, grant, caller_ip="10.0.0.1", requested_role=requested, resolver=resolver)
        is None
    )


@pytest.mark.parametrize("requested", ["other", BASE + "other", "arn:aws:iam::1:role/x", "a b"])
def test_requesting_a_role_that_is_not_the_pods_is_denied(requested):
    pod, grant = _permitted_pod()
    denial = check_request(
        pod, grant, caller_ip="10.0.0.1", requested_role=requested, resolver=resolver
    )
    assert denial.reason is Reason.ROLE_MISMATCH


def test_caller_on_another_node_is_denied_unless_binding_is_off():
    pod, grant = _permitted_pod(host_ip="10.0.0.1")
    denial = check_request(pod, grant, caller_ip="10.0.0.2", requested_role=None, resolver=resolver)
    assert denial.reason is Reason.NODE_MISMATCH
    assert check_request(pod, grant, caller_ip=None, requested_role=None, resolver=resolver) is None


def test_event_reasons_are_camel_case():
    assert Reason.NOT_PERMITTED.event_reason == "PodiamNotPermitted"
