"""podiam-server's flags: defaults, environment twins, and clear refusals of bad values."""

from __future__ import annotations

from datetime import timedelta

import pytest

from runtime.flags import CANNOT_START, duration
from server.config import parse_config

REQUIRED = ["--cert", "c.pem", "--key", "k.pem", "--ca", "ca.pem"]
BASE = ["--role-base-arn", "arn:aws:iam::123456789012:role/"]


def parse(*args: str, environ: dict[str, str] | None = None):
    return parse_config([*REQUIRED, *args], environ=environ or {})


def refused(capsys, *args: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_config(list(args), environ=environ or {})
    # One line, like every start-up error, and the one "cannot start" exit code.
    assert exit_info.value.code == CANNOT_START
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("podiam-server: error: "), err
    return err


def test_defaults_are_the_eks_defaults():
    config = parse(*BASE)
    assert config.bind == ("0.0.0.0", 443)
    assert config.session_duration == timedelta(hours=1)
    assert config.session_refresh == timedelta(minutes=35)
    assert config.session_name == "podiam"
    assert config.node_binding is True
    assert config.prometheus_listen_addr == ("0.0.0.0", 9620)
    assert config.metadata_endpoint == "http://169.254.169.254"
    assert config.role_base_arn == "arn:aws:iam::123456789012:role/"


def test_every_flag_has_an_environment_twin():
    environ = {
        "PODIAM_CERT": "/tls/cert",
        "PODIAM_KEY": "/tls/key",
        "PODIAM_CA": "/tls/ca",
        "PODIAM_BIND": "127.0.0.1:8443",
        "PODIAM_ROLE_BASE_ARN": "arn:aws:iam::123456789012:role/pods",
        "PODIAM_SESSION_DURATION": "2h",
        "PODIAM_SESSION_REFRESH": "45m",
        "PODIAM_NO_NODE_BINDING": "true",
        "PODIAM_JSON_LOG": "1",
        "PODIAM_REGION": "eu-west-1",
        "PODIAM_PROMETHEUS_LISTEN_ADDR": "",
    }
    config = parse_config([], environ=environ)
    assert str(config.cert) == "/tls/cert"
    assert config.bind == ("127.0.0.1", 8443)
    assert config.role_base_arn == "arn:aws:iam::123456789012:role/pods/"
    assert config.session_duration == timedelta(hours=2)
    assert config.session_refresh == timedelta(minutes=45)
    assert config.node_binding is False
    assert config.json_log is True
    assert config.region == "eu-west-1"
    assert config.prometheus_listen_addr is None


def test_node_streams_send_every_change_at_once_by_default_and_can_linger():
    assert parse(*BASE).node_stream_linger == timedelta(0)
    config = parse(*BASE, environ={"PODIAM_NODE_STREAM_LINGER": "50ms"})
    assert config.node_stream_linger == timedelta(milliseconds=50)


def test_a_flag_wins_over_its_environment_twin():
    config = parse(*BASE, "--session-name", "flag", environ={"PODIAM_SESSION_NAME": "env"})
    assert config.session_name == "flag"


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("15m", 900), ("1h", 3600), ("1h30m", 5400), ("900", 900)]
)
def test_durations_accept_units(text, seconds):
    assert duration(text).total_seconds() == seconds


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--session-refresh", "25m"], "at least 30m"),
        (["--session-refresh", "1h"], "shorter than --session-duration"),
        (["--session-duration", "10m"], "between 15m and 12h"),
        (["--session-duration", "13h"], "between 15m and 12h"),
        (["--session-duration", "forever"], "invalid duration"),
        (["--bind", "nowhere"], "expected host:port"),
        (["--assume-role-arn", "not-an-arn"], "not an IAM role ARN"),
        (["--log-level", "loud"], "invalid log level"),
        (["--allowed-account", "1234"], "not a 12-digit AWS account id"),
        (["--allowed-account", "12345678901a"], "not a 12-digit AWS account id"),
        (["--node-stream-linger", "600ms"], "between 0 and 500ms"),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(capsys, args, message):
    assert message in refused(capsys, *REQUIRED, *BASE, *args)


def test_allowed_accounts_are_the_base_accounts_only_unless_listed():
    assert parse(*BASE).allowed_accounts == frozenset()
    listed = parse(*BASE, "--allowed-account", "111111111111", "--allowed-account=222222222222")
    assert listed.allowed_accounts == {"111111111111", "222222222222"}


def test_allowed_accounts_from_the_environment_and_a_flag_wins():
    environ = {"PODIAM_ALLOWED_ACCOUNT": "111111111111, 222222222222"}
    assert parse(*BASE, environ=environ).allowed_accounts == {"111111111111", "222222222222"}
    flagged = parse(*BASE, "--allowed-account", "333333333333", environ=environ)
    assert flagged.allowed_accounts == {"333333333333"}


def test_bad_allowed_account_in_the_environment_names_the_variable(capsys):
    err = refused(capsys, *REQUIRED, *BASE, environ={"PODIAM_ALLOWED_ACCOUNT": "nope"})
    assert "PODIAM_ALLOWED_ACCOUNT 'nope' is not a 12-digit AWS account id" in err


def test_bad_base_arn_is_refused(capsys):
    assert "not of the form" in refused(capsys, *REQUIRED, "--role-base-arn", "arn:aws:s3:::x")


def test_a_base_arn_source_is_required(capsys):
    assert "--role-base-arn" in refused(capsys, *REQUIRED)


def test_certificates_are_required(capsys):
    assert "--cert" in refused(capsys, *BASE)


def test_bad_environment_value_names_the_variable(capsys):
    err = refused(capsys, *REQUIRED, *BASE, environ={"PODIAM_SESSION_DURATION": "soon"})
    assert "PODIAM_SESSION_DURATION" in err


def test_connection_age_grace_defaults_to_30s_and_has_an_env_twin():
    assert parse(*BASE).max_connection_age_grace == timedelta(seconds=30)
    environ = {"PODIAM_MAX_CONNECTION_AGE_GRACE": "2s"}
    assert parse(*BASE, environ=environ).max_connection_age_grace == timedelta(seconds=2)
    assert parse(*BASE, "--max-connection-age-grace", "1m").max_connection_age_grace == timedelta(
        minutes=1
    )
