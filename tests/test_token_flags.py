"""The token-bound credentials' flags, on both programs: defaults, environment twins, and bad
values refused with one clear message."""

from __future__ import annotations

import pytest

from agent.config import parse_config as parse_agent
from runtime.flags import CANNOT_START
from server.config import parse_config as parse_server

AGENT = ["--host", "10.0.0.5", "--cert", "a.pem", "--key", "k.pem", "--ca", "ca.pem"]
SERVER = [
    "--cert", "s.pem", "--key", "k.pem", "--ca", "ca.pem",
    "--role-base-arn", "arn:aws:iam::123456789012:role/",
]  # fmt: skip


def refused(capsys, parse, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        parse(argv, environ={})
    # One line, like every start-up error, and the one "cannot start" exit code.
    assert exit_.value.code == CANNOT_START
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_token_credentials_are_off_unless_asked_for():
    agent = parse_agent(AGENT, environ={})
    assert not agent.token_endpoint
    assert (agent.token_address, agent.token_port) == (("169.254.170.23", 80), 8182)
    server = parse_server(SERVER, environ={})
    assert not server.token_credentials
    assert server.webhook_bind is None
    assert server.webhook_endpoint == "http://169.254.170.23/v1/credentials"
    assert server.token_audience == "podiam"


def test_every_token_flag_has_an_environment_twin():
    agent = parse_agent(
        AGENT,
        environ={
            "PODIAM_TOKEN_ENDPOINT": "true",
            "PODIAM_TOKEN_ADDRESS": "169.254.170.2:80",
            "PODIAM_TOKEN_PORT": "9182",
        },
    )
    assert agent.token_endpoint
    assert (agent.token_address, agent.token_port) == (("169.254.170.2", 80), 9182)
    server = parse_server(
        SERVER,
        environ={
            "PODIAM_TOKEN_CREDENTIALS": "1",
            "PODIAM_TOKEN_AUDIENCE": "podiam-prod",
            "PODIAM_WEBHOOK_BIND": ":8444",
            "PODIAM_WEBHOOK_ENDPOINT": "http://169.254.170.2/v1/credentials",
            "PODIAM_WEBHOOK_TOKEN_EXPIRATION": "1h",
        },
    )
    assert server.token_credentials and server.token_audience == "podiam-prod"
    assert server.webhook_bind == ("0.0.0.0", 8444)
    assert server.webhook_token_expiration.total_seconds() == 3600


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--token-address", "169.254.170.23"], "is not an IPv4 address:port"),
        (["--token-address", "fd00:ec2::23:80"], "is not an IPv4 address:port"),
        (["--token-address", "169.254.170.23:0"], "is not an IPv4 address:port"),
        (["--token-port", "70000"], "--token-port"),
    ],
)
def test_bad_agent_token_flags_are_refused(capsys, argv, message):
    assert message in refused(capsys, parse_agent, AGENT + argv)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--webhook-token-expiration", "5m"], "between 10m and 24h"),
        (["--webhook-endpoint", "169.254.170.23/v1/credentials"], "http:// or https://"),
        (["--webhook-bind", "nowhere"], "expected host:port"),
        (["--token-audience", " "], "--token-audience must not be empty"),
    ],
)
def test_bad_server_token_flags_are_refused(capsys, argv, message):
    assert message in refused(capsys, parse_server, SERVER + argv)
