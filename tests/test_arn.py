"""Role ARN resolution and base-ARN detection from the instance profile."""

from __future__ import annotations

import pytest

from server.arn import ArnError, RoleResolver, base_arn_from_instance_profile, normalise_base_arn

BASE = "arn:aws:iam::123456789012:role/"


@pytest.mark.parametrize(
    ("annotation", "arn"),
    [
        ("reader", BASE + "reader"),
        ("/reader", BASE + "reader"),
        ("team/reader", BASE + "team/reader"),
        ("arn:aws:iam::999999999999:role/x", "arn:aws:iam::999999999999:role/x"),
        ("arn:aws-cn:iam::999999999999:role/x", "arn:aws-cn:iam::999999999999:role/x"),
    ],
)
def test_annotations_resolve_to_role_arns(annotation, arn):
    assert RoleResolver(BASE).resolve(annotation) == arn


@pytest.mark.parametrize(
    "annotation",
    [
        "", "/", "a b", "arn:aws:iam::1:role/x", "x//y", "é", "x/../y", "./y", "x/.", "x/",
        "a" * 65, "team/a b/reader", BASE, BASE + "/x", BASE + "a/../x", BASE + "a/..",
    ],
)  # fmt: skip
def test_invalid_annotations_are_refused(annotation):
    with pytest.raises(ArnError):
        RoleResolver(BASE).resolve(annotation)


def test_iam_path_characters_and_lengths_are_accepted():
    resolver = RoleResolver(BASE)
    assert resolver.resolve("a!b~c/x.y@z") == BASE + "a!b~c/x.y@z"
    assert resolver.resolve("r" * 64) == BASE + "r" * 64
    assert resolver.resolve("p" * 510 + "/reader") == BASE + "p" * 510 + "/reader"


def test_base_arn_with_dot_dot_segment_is_refused():
    with pytest.raises(ArnError, match=r"'\.\.'"):
        normalise_base_arn("arn:aws:iam::123456789012:role/pods/../")


def test_short_name_only_under_the_base():
    resolver = RoleResolver(BASE)
    assert resolver.short_name(BASE + "team/reader") == "team/reader"
    assert resolver.short_name("arn:aws:iam::999999999999:role/reader") is None


def test_base_arn_gets_its_trailing_slash():
    assert normalise_base_arn("arn:aws:iam::123456789012:role") == BASE
    assert normalise_base_arn("arn:aws:iam::123456789012:role/pods") == BASE + "pods/"


def test_base_arn_from_instance_profile_keeps_partition_and_account():
    profile = "arn:aws-us-gov:iam::123456789012:instance-profile/nodes"
    assert base_arn_from_instance_profile(profile) == "arn:aws-us-gov:iam::123456789012:role/"
    with pytest.raises(ArnError):
        base_arn_from_instance_profile("arn:aws:iam::123456789012:user/bob")


def test_refusals_are_repeated_for_every_ask_and_quote_huge_roles_briefly():
    resolver = RoleResolver(BASE)
    for _ in range(2):  # the second answer comes from the resolver's memory
        with pytest.raises(ArnError, match="not allowed"):
            resolver.resolve("app-x/../admin")
    huge = "team/" + "x" * 256 * 1024  # an annotation as large as Kubernetes allows
    with pytest.raises(ArnError) as refused:
        resolver.resolve(huge)
    assert len(str(refused.value)) < 500 and "characters" in str(refused.value)
