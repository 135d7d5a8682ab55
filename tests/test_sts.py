"""The STS gateway against a real STS-speaking server (moto, behind a counting front)."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta

import pytest
from botocore.exceptions import ClientError
from prometheus_client import REGISTRY

from server.identity import RoleIdentity
from server.sts import StsError, StsGateway, session_name_for
from tests.support.moto_sts import MotoSts, caller_arn, fake_session

# `sts` (moto, reset per test) and `gateway` come from tests/support/fixtures.py.

ACCOUNT = "123456789012"
POD_ROLE = f"arn:aws:iam::{ACCOUNT}:role/orders-api"
HOP_ROLE = f"arn:aws:iam::{ACCOUNT}:role/podiam-server"


def sts_calls_metric(outcome: str) -> float:
    return REGISTRY.get_sample_value("podiam_sts_assume_role_total", {"outcome": outcome}) or 0.0


async def test_assume_role_returns_credentials_of_the_pod_role_session(
    gateway: StsGateway, sts: MotoSts
) -> None:
    creds = await gateway.assume_role(RoleIdentity(POD_ROLE, "orders-api-7d9f"))

    assert caller_arn(sts.endpoint_url, creds) == (
        f"arn:aws:sts::{ACCOUNT}:assumed-role/orders-api/orders-api-7d9f"
    )
    assert creds.access_key_id.startswith("ASIA") and creds.secret_access_key and creds.token
    assert sts.assume_role_calls(POD_ROLE) == 1
    assert sts.calls()[0].duration_seconds == 3600


async def test_times_are_utc_whole_seconds_and_expiry_is_one_session_away(
    gateway: StsGateway,
) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    creds = await gateway.assume_role(RoleIdentity(POD_ROLE, "times"))
    after = datetime.now(UTC)

    for moment in (creds.expiration, creds.last_updated):
        assert moment.tzinfo is not None and moment.utcoffset() == timedelta(0)
        assert moment.microsecond == 0
    assert before <= creds.last_updated <= after
    assert timedelta(minutes=59) <= creds.expiration - creds.last_updated <= timedelta(minutes=61)


async def test_session_duration_is_what_sts_is_asked_for(sts: MotoSts) -> None:
    gateway = StsGateway(
        region="us-east-1",
        endpoint_url=sts.endpoint_url,
        boto_session=fake_session(),
        session_duration=timedelta(minutes=15),
    )
    try:
        creds = await gateway.assume_role(RoleIdentity(POD_ROLE, "short"))
    finally:
        gateway.close()
    assert sts.calls()[0].duration_seconds == 900
    assert creds.seconds_left() <= 900


async def test_external_id_is_sent_only_when_the_pod_has_one(
    gateway: StsGateway, sts: MotoSts
) -> None:
    await gateway.assume_role(RoleIdentity(POD_ROLE, "with-ext", external_id="tenant-42"))
    await gateway.assume_role(RoleIdentity(POD_ROLE, "without-ext"))

    with_ext, without_ext = sts.calls(POD_ROLE)
    assert with_ext.external_id == "tenant-42"
    assert without_ext.external_id is None
    assert sts.assume_role_calls(POD_ROLE, failed=False) == 2


async def test_sts_error_becomes_sts_error_with_the_aws_code_and_no_secrets(
    gateway: StsGateway, sts: MotoSts
) -> None:
    denied_before = sts_calls_metric("AccessDenied")
    sts.fail_next(1, "AccessDenied")

    with pytest.raises(StsError) as caught:
        await gateway.assume_role(RoleIdentity(POD_ROLE, "denied", external_id="s3cr3t-ext"))

    error = caught.value
    assert error.code == "AccessDenied"
    assert "\n" not in str(error)
    assert POD_ROLE in str(error) and "AccessDenied" in str(error)
    assert "s3cr3t-ext" not in str(error) and "testing" not in str(error)
    assert sts_calls_metric("AccessDenied") == denied_before + 1


async def test_unreachable_sts_is_an_sts_error_named_for_the_failure() -> None:
    gateway = StsGateway(
        region="us-east-1", endpoint_url="http://127.0.0.1:1", boto_session=fake_session()
    )
    try:
        with pytest.raises(StsError) as caught:
            await gateway.assume_role(RoleIdentity(POD_ROLE, "nowhere"))
    finally:
        gateway.close()
    assert caught.value.code == "EndpointConnectionError"


async def test_calls_run_off_the_event_loop(gateway: StsGateway, sts: MotoSts) -> None:
    # The loop keeps ticking while AssumeRole calls are in flight in the worker threads.
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticking = asyncio.create_task(ticker())
    try:
        await asyncio.gather(
            *(gateway.assume_role(RoleIdentity(POD_ROLE, f"par-{i}")) for i in range(16))
        )
    finally:
        ticking.cancel()
    assert sts.assume_role_calls(POD_ROLE) == 16
    assert ticks > 16


async def test_regional_endpoint_is_used_for_the_region() -> None:
    gateway = StsGateway(region="eu-west-1", boto_session=fake_session())
    try:
        assert gateway._client_for_pods.meta.endpoint_url == "https://sts.eu-west-1.amazonaws.com"
    finally:
        gateway.close()


async def test_intermediate_role_is_assumed_once_and_signs_pod_calls(sts: MotoSts) -> None:
    gateway = StsGateway(
        region="us-east-1",
        endpoint_url=sts.endpoint_url,
        boto_session=fake_session(),
        assume_role_arn=HOP_ROLE,
    )
    try:
        results = [await gateway.assume_role(RoleIdentity(POD_ROLE, f"pod-{i}")) for i in range(3)]
    finally:
        gateway.close()

    assert sts.assume_role_calls(HOP_ROLE) == 1
    assert sts.assume_role_calls(POD_ROLE) == 3
    (hop_call,) = sts.calls(HOP_ROLE)
    assert hop_call.signed_with == "testing"  # the server's own credentials
    assert re.fullmatch(r"podiam-server-[\w+=,.@-]+", hop_call.session_name)
    signers = {call.signed_with for call in sts.calls(POD_ROLE)}
    assert len(signers) == 1 and signers != {"testing"}  # the intermediate role's credentials
    assert caller_arn(sts.endpoint_url, results[-1]) == (
        f"arn:aws:sts::{ACCOUNT}:assumed-role/orders-api/pod-2"
    )


async def test_intermediate_role_failure_fails_the_pod_call_with_its_code(sts: MotoSts) -> None:
    gateway = StsGateway(
        region="us-east-1",
        endpoint_url=sts.endpoint_url,
        boto_session=fake_session(),
        assume_role_arn=HOP_ROLE,
    )
    sts.fail_next(1, "AccessDenied")
    try:
        with pytest.raises(StsError) as caught:
            await gateway.assume_role(RoleIdentity(POD_ROLE, "pod"))
        assert caught.value.code == "AccessDenied"
        assert caught.value.role_arn == HOP_ROLE
        assert sts.assume_role_calls(POD_ROLE) == 0
        # Next time the intermediate role is tried again, and then the pod's.
        creds = await gateway.assume_role(RoleIdentity(POD_ROLE, "pod"))
    finally:
        gateway.close()
    assert sts.assume_role_calls(HOP_ROLE) == 2
    assert caller_arn(sts.endpoint_url, creds).endswith("assumed-role/orders-api/pod")


async def test_closed_gateway_refuses_calls(sts: MotoSts) -> None:
    gateway = StsGateway(
        region="us-east-1", endpoint_url=sts.endpoint_url, boto_session=fake_session()
    )
    gateway.close()
    with pytest.raises(StsError) as caught:
        await gateway.assume_role(RoleIdentity(POD_ROLE, "late"))
    assert caught.value.code == "GatewayClosed"
    assert sts.assume_role_calls() == 0


@pytest.mark.parametrize(
    ("prefix", "suffix", "expected"),
    [
        ("default", "orders-api-7d9f", "default-orders-api-7d9f"),
        ("kube-system", "coredns_1.2", "kube-system-coredns_1.2"),
        ("ns", "a b/c:d*e", "ns-a-b-c-d-e"),
        ("ns", "user+tag=x,y.z@host", "ns-user+tag=x,y.z@host"),
        ("ns", "pod\u00e9", "ns-pod-"),  # only ASCII word characters are allowed
    ],
)
def test_session_name_for_replaces_forbidden_characters(
    prefix: str, suffix: str, expected: str
) -> None:
    assert session_name_for(prefix, suffix) == expected


def test_session_name_for_truncates_to_64_characters() -> None:
    name = session_name_for("a-very-long-namespace-name", "x" * 100)
    assert len(name) == 64
    assert name.startswith("a-very-long-namespace-name-xxx")


async def test_sanitised_session_name_is_accepted_by_sts(gateway: StsGateway, sts: MotoSts) -> None:
    name = session_name_for("team/billing", "invoice worker:" + "z" * 80)
    creds = await gateway.assume_role(RoleIdentity(POD_ROLE, name))
    assert caller_arn(sts.endpoint_url, creds).endswith(f"/orders-api/{name}")


async def test_short_test_sessions_expire_as_advertised_and_are_then_refused_like_aws(
    gateway: StsGateway, sts: MotoSts
) -> None:
    # The SDK matrix's refresh check relies on this: a short session from the test STS that is
    # used after its advertised expiry fails, as it would against AWS.
    sts.shorten_sessions(POD_ROLE, 2)
    before = datetime.now(UTC).replace(microsecond=0)
    creds = await gateway.assume_role(RoleIdentity(POD_ROLE, "short"))
    assert before + timedelta(seconds=2) <= creds.expiration <= before + timedelta(seconds=3)
    assert caller_arn(sts.endpoint_url, creds).endswith("/orders-api/short")
    # Refused once expired (allowing a second for a request signed just before expiry).
    await asyncio.sleep((creds.expiration - datetime.now(UTC)).total_seconds() + 1.2)
    with pytest.raises(ClientError, match="ExpiredToken"):
        caller_arn(sts.endpoint_url, creds)
    other = await gateway.assume_role(RoleIdentity(HOP_ROLE, "long"))
    assert other.expiration - datetime.now(UTC) > timedelta(minutes=59)
