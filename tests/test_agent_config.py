"""podiam-agent's flags: defaults, environment twins, and clear refusals of bad values."""

from __future__ import annotations

from datetime import timedelta

import pytest

from agent.config import parse_config
from agent.replicas import parse_addresses
from runtime.flags import CANNOT_START

REQUIRED = ["--host", "10.0.0.5", "--cert", "a.pem", "--key", "k.pem", "--ca", "ca.pem"]


def refused(capsys, *args: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_config(list(args), environ=environ or {})
    # One line, like every start-up error, and the one "cannot start" exit code.
    assert exit_info.value.code == CANNOT_START
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("podiam-agent: error: "), err
    return err


def test_defaults():
    config = parse_config(REQUIRED, environ={})
    assert config.port == 8181
    assert config.server_address == "podiam-server:443"
    assert config.host_interface == "eni+"
    assert config.iptables is False
    assert (config.conntrack, config.ready_file) == ("conntrack", None)
    assert config.pod_wait == timedelta(seconds=0.9)
    assert config.stale_grace == timedelta(seconds=25)
    assert config.metadata_endpoint == "http://169.254.169.254"
    assert config.require_imdsv2 is False
    assert config.node_name == ""  # no startup-taint report
    assert config.prometheus_listen_addr == ("0.0.0.0", 9620)
    allow = config.allow_route_regexp
    assert allow.fullmatch("/latest/meta-data/placement/region")
    assert allow.fullmatch("/latest/meta-data/placement/availability-zone")
    assert allow.fullmatch("/latest/dynamic/instance-identity/document")
    assert not allow.fullmatch("/latest/meta-data/iam/info")


def test_host_comes_from_host_ip_as_kubernetes_sets_it():
    environ = {"HOST_IP": "10.1.2.3", "PODIAM_CERT": "c", "PODIAM_KEY": "k", "PODIAM_CA": "ca"}
    environ |= {"PODIAM_IPTABLES": "true", "PODIAM_HOST_INTERFACE": "cali+"}
    environ |= {"PODIAM_POD_WAIT": "500ms", "PODIAM_REQUIRE_IMDSV2": "yes"}
    config = parse_config([], environ=environ)
    assert config.host == "10.1.2.3"
    assert config.iptables is True
    assert config.host_interface == "cali+"
    assert config.pod_wait == timedelta(milliseconds=500)
    assert config.require_imdsv2 is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host", "node-1"], "not an IP address"),
        (["--port", "99999"], "invalid port '99999'"),
        (["--port", "abc"], "argument --port: invalid port 'abc': expected a number 0-65535"),
        (["--host-interface", "eth0; rm -rf /"], "invalid interface"),
        (["--allow-route-regexp", "(unclosed"], "invalid regular expression"),
        (["--pod-wait", "0s"], "--pod-wait"),
        (["--server-address", "podiam-server"], "host:port"),
        (["--server-address", "a:1,b"], "'b' is not host:port"),
        (["--server-address", "a:1,,b:2"], "is not host:port"),
        (["--stale-grace", "2h"], "--stale-grace"),
        (["--metadata-endpoint", "169.254.169.254"], "http://"),
        (["--node-name", "Node_1"], "--node-name"),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(capsys, args, message):
    assert message in refused(capsys, *REQUIRED, *args)


def test_several_server_replicas_and_a_stale_grace_are_accepted():
    argv = [*REQUIRED, "--server-address", "10.0.0.1:8443, podiam-server:8443,[fd00::1]:8443"]
    config = parse_config([*argv, "--stale-grace", "0s"], environ={})
    assert parse_addresses(config.server_address) == [
        ("10.0.0.1", 8443), ("podiam-server", 8443), ("fd00::1", 8443),
    ]  # fmt: skip
    assert config.stale_grace == timedelta(0)
    assert parse_config(REQUIRED, environ={"PODIAM_STALE_GRACE": "5s"}).stale_grace == timedelta(
        seconds=5
    )


def test_host_is_required(capsys):
    assert "--host" in refused(capsys, "--cert", "a", "--key", "k", "--ca", "c")


def test_inverted_interface_is_accepted():
    assert parse_config([*REQUIRED, "--host-interface", "!docker0"], environ={}).host_interface == (
        "!docker0"
    )


def test_node_name_comes_from_node_name_as_kubernetes_sets_it():
    environ = {"NODE_NAME": "ip-10-1-2-3.eu-west-1.compute.internal"}
    assert parse_config(REQUIRED, environ=environ).node_name == environ["NODE_NAME"]
    flagged = parse_config([*REQUIRED, "--node-name", "worker-7"], environ=environ)
    assert flagged.node_name == "worker-7"


@pytest.mark.parametrize(
    ("pattern", "dead"),
    [
        ("meta-data/hostname", "'meta-data/hostname' can never match"),
        ("^latest/meta-data/hostname$", "'^latest/meta-data/hostname$' can never match"),
        ("^/latest/meta-data/hostname$|meta-data/local-ipv4", "the alternative 'meta-data/local"),
        ("(?:placement/region|/latest/x)", "can never match"),
        ("(?i)latest/meta-data/hostname", "can never match"),
    ],
)
def test_kiam_style_route_patterns_that_can_never_match_are_refused_with_a_hint(
    capsys, pattern, dead
):
    # kiam searched for its pattern within the path; podiam matches the whole path, so these
    # would silently allow nothing.
    err = refused(capsys, *REQUIRED, "--allow-route-regexp", pattern)
    assert dead in err and "must match the whole path" in err


def test_a_refused_kiam_pattern_suggests_the_whole_path(capsys):
    err = refused(capsys, *REQUIRED, "--allow-route-regexp", "meta-data/hostname")
    assert err.endswith("write '^/latest/meta-data/hostname'\n")


@pytest.mark.parametrize(
    "pattern",
    [
        "^/latest/meta-data/hostname$",
        "/latest/meta-data/(hostname|local-ipv4)",
        r"\A/latest/meta-data/hostname",
        ".*/hostname",
        "(?=/latest/).*/hostname",
        "^$",  # nothing allowed: a deliberate choice, not a mistake
    ],
)
def test_route_patterns_that_can_match_a_path_are_accepted(pattern):
    config = parse_config([*REQUIRED, "--allow-route-regexp", pattern], environ={})
    assert config.allow_route_regexp.pattern == pattern


def test_the_rule_removing_flag_is_gone_so_no_stop_can_open_the_metadata_service(capsys):
    # The rule outlives the agent; removal is `podiam-agent cleanup`, never a shutdown option.
    with pytest.raises(SystemExit):
        parse_config([*REQUIRED, "--no-iptables-remove"], environ={})
    assert "unrecognized arguments: --no-iptables-remove" in capsys.readouterr().err
