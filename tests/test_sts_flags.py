"""podiam-server's STS economy flags: session naming, session tags, the STS rate budget and the
audit trail — defaults, environment twins, and clear refusals."""

from __future__ import annotations

import pytest

from runtime.flags import CANNOT_START
from server.config import parse_config
from server.sessions import SessionNameFrom

REQUIRED = [
    "--cert", "c.pem", "--key", "k.pem", "--ca", "ca.pem",
    "--role-base-arn", "arn:aws:iam::123456789012:role/",
]  # fmt: skip


def parse(*args: str, environ: dict[str, str] | None = None):
    return parse_config([*REQUIRED, *args], environ=environ or {})


def refused(capsys, *args: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse(*args, environ=environ)
    assert exit_info.value.code == CANNOT_START
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("podiam-server: error: "), err
    return err


def test_sessions_are_named_after_workloads_by_default():
    assert parse().session_name_from is SessionNameFrom.WORKLOAD


def test_session_name_from_has_an_environment_twin_and_the_flag_wins():
    env = {"PODIAM_SESSION_NAME_FROM": "fixed"}
    assert parse(environ=env).session_name_from is SessionNameFrom.FIXED
    assert parse("--session-name-from", "pod", environ=env).session_name_from is SessionNameFrom.POD


def test_unknown_session_name_source_is_refused(capsys):
    assert "workload, pod, fixed" in refused(capsys, "--session-name-from", "replica")
    assert "PODIAM_SESSION_NAME_FROM" in refused(
        capsys, environ={"PODIAM_SESSION_NAME_FROM": "replica"}
    )


def test_audit_trail_goes_with_the_other_logs_unless_a_file_is_named():
    assert parse().audit_log == "-"
    assert parse(environ={"PODIAM_AUDIT_LOG": "/var/log/a"}).audit_log == "/var/log/a"
    assert parse("--audit-log", "/tmp/b", environ={"PODIAM_AUDIT_LOG": "/a"}).audit_log == "/tmp/b"


def test_session_tags_are_off_by_default_and_switch_on_with_their_twins():
    config = parse()
    assert (config.session_tags, config.transitive_session_tags, config.cluster_name) == (
        False,
        False,
        "",
    )
    env = {
        "PODIAM_SESSION_TAGS": "true",
        "PODIAM_TRANSITIVE_SESSION_TAGS": "true",
        "PODIAM_CLUSTER_NAME": "prod-eu",
    }
    config = parse(environ=env)
    assert (config.session_tags, config.transitive_session_tags, config.cluster_name) == (
        True,
        True,
        "prod-eu",
    )


def test_transitive_tags_without_tags_are_refused(capsys):
    assert "needs --session-tags" in refused(capsys, "--transitive-session-tags")


def test_cluster_name_that_sts_would_reject_as_a_tag_is_refused(capsys):
    assert "not a valid session tag value" in refused(capsys, "--cluster-name", "prod#1")


def test_sts_budget_defaults_and_environment_twins():
    config = parse()
    assert (config.sts_qps, config.sts_burst) == (50.0, 100)
    config = parse(environ={"PODIAM_STS_QPS": "7.5", "PODIAM_STS_BURST": "20"})
    assert (config.sts_qps, config.sts_burst) == (7.5, 20)


@pytest.mark.parametrize(
    "args", [("--sts-qps", "0"), ("--sts-qps", "-1"), ("--sts-burst", "0"), ("--sts-burst", "2.5")]
)
def test_sts_budget_that_would_allow_nothing_is_refused(capsys, args):
    assert args[0] in refused(capsys, *args)
