"""``podiam-agent`` flags: parsing and validation, testable without starting anything."""

from __future__ import annotations

import argparse
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from agent.limits import ListenerLimits
from agent.proxy import DEFAULT_ALLOW_ROUTE_REGEXP
from agent.replicas import parse_addresses
from runtime import imds
from runtime.flags import EnvDefaultsParser, duration, port

_INTERFACE = re.compile(r"^!?[A-Za-z0-9_.:+-]{1,15}$")
# A node's name is a DNS subdomain (RFC 1123), at most 253 characters.
_NODE_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")


@dataclass(frozen=True, slots=True)
class AgentConfig:
    host: str
    node_name: str
    port: int
    server_address: str
    cert: Path
    key: Path
    ca: Path
    iptables: bool
    host_interface: str
    conntrack: str
    ready_file: Path | None
    allow_route_regexp: re.Pattern[str]
    metadata_endpoint: str
    pod_wait: timedelta
    stale_grace: timedelta
    require_imdsv2: bool
    limits: ListenerLimits
    prometheus_listen_addr: tuple[str, int] | None
    token_endpoint: bool
    token_address: tuple[str, int]
    token_port: int
    log_level: str
    json_log: bool


def build_parser(environ: Mapping[str, str] | None = None) -> EnvDefaultsParser:
    parser = EnvDefaultsParser(
        prog="podiam-agent",
        description=(
            "The podiam agent: runs on every node (hostNetwork), intercepts the pods' requests "
            "to the EC2 metadata service (169.254.169.254) with an iptables DNAT rule, and "
            "answers them with credentials for each pod's own IAM role, obtained from the "
            "podiam server over mutual-TLS gRPC. It holds no AWS or Kubernetes permissions."
        ),
        epilog="'podiam-agent cleanup' removes the DNAT rule, which outlives the agent "
        "(see 'podiam-agent cleanup --help').",
        environ=environ,
    )
    flag = parser.add_flag
    flag(
        "--host",
        env="HOST_IP",
        required=True,
        help="the node's IP: the agent listens on it and the DNAT rule points to it "
        "(in Kubernetes, from status.hostIP)",
    )
    flag(
        "--node-name",
        env="NODE_NAME",
        default="",
        help="the Kubernetes node this agent runs on (in Kubernetes, from spec.nodeName); "
        "the agent reports it ready to the server, which then removes its startup taint",
    )
    flag("--port", env="PODIAM_PORT", type=port, default="8181", help="port of the metadata API")
    flag(
        "--server-address",
        env="PODIAM_SERVER_ADDRESS",
        default="podiam-server:443",
        help="podiam server host:port, or several comma-separated; every address a name "
        "resolves to (a headless Service) is a replica: the agent follows two replicas' node "
        "streams at once and balances unary calls round-robin",
    )
    parser.add_tls_flags(
        cert_help="PEM agent client certificate (clientAuth)",
        ca_help="PEM CA bundle the server certificate must chain to",
    )
    flag(
        "--iptables",
        env="PODIAM_IPTABLES",
        action="store_true",
        help="install the DNAT rule for 169.254.169.254:80 (needs NET_ADMIN) and cut "
        "connections opened before it; the rule stays when the agent stops (remove it with "
        "'podiam-agent cleanup')",
    )
    flag(
        "--host-interface",
        env="PODIAM_HOST_INTERFACE",
        type=_interface,
        default="eni+",
        help="interface(s) the pods' traffic arrives on: eni+ (AWS VPC CNI), cali+ (Calico), "
        "lxc+ (Cilium), docker0; a leading ! inverts the match",
    )
    flag(
        "--conntrack",
        env="PODIAM_CONNTRACK",
        default="conntrack",
        help="the conntrack tool, run with --iptables after the rule is in place to cut "
        "connections opened to 169.254.169.254:80 before it",
    )
    flag(
        "--ready-file",
        env="PODIAM_READY_FILE",
        type=_optional_path,
        default="",
        help="a file that exists exactly while this agent is ready (listening, node stream "
        "live with its snapshot): the readiness probe, which during an upgrade must ask this "
        "process rather than whichever agent answers the shared port; empty: none",
    )
    flag(
        "--allow-route-regexp",
        env="PODIAM_ALLOW_ROUTE_REGEXP",
        type=_regexp,
        default=DEFAULT_ALLOW_ROUTE_REGEXP,
        help="other metadata paths proxied to the real metadata service, matched against "
        "the whole path; everything else is refused",
    )
    flag(
        "--metadata-endpoint",
        env="PODIAM_METADATA_ENDPOINT",
        default=imds.ENDPOINT,
        help="the real EC2 metadata service",
    )
    flag(
        "--pod-wait",
        env="PODIAM_POD_WAIT",
        type=duration,
        default="0.9s",
        help="how long to wait for a pod the agent does not know yet (SDKs give the "
        "metadata service about 1s)",
    )
    flag(
        "--stale-grace",
        env="PODIAM_STALE_GRACE",
        type=duration,
        default="25s",
        help="while no podiam server is reachable, how long to keep serving cached "
        "credentials for a pod whose IP has no per-pod host route to vouch for it (the default "
        "stays below the AWS VPC CNI's 30s IP cooldown; set 0 for CNIs that reuse IPs at once). "
        "Pods with such a route are served until their credentials expire or the route changes",
    )
    flag(
        "--require-imdsv2",
        env="PODIAM_REQUIRE_IMDSV2",
        action="store_true",
        help="refuse credential requests without a valid IMDSv2 token",
    )
    _add_limit_flags(flag)
    flag(
        "--token-endpoint",
        env="PODIAM_TOKEN_ENDPOINT",
        action="store_true",
        help="serve token-bound credentials: GET /v1/credentials with the pod's projected "
        "service-account token as the Authorization header (AWS_CONTAINER_CREDENTIALS_FULL_URI "
        "and AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE, set by podiam's admission webhook)",
    )
    flag(
        "--token-address",
        env="PODIAM_TOKEN_ADDRESS",
        type=ipv4_port,
        default="169.254.170.23:80",
        help="the address pods ask for token-bound credentials; with --iptables a DNAT rule "
        "sends it to --host:--token-port. The EKS Pod Identity add-on uses 169.254.170.23 too: "
        "with the add-on installed choose another link-local address (and the webhook's "
        "endpoint to match)",
    )
    flag(
        "--token-port",
        env="PODIAM_TOKEN_PORT",
        type=port,
        default="8182",
        help="port on --host where the agent serves token-bound credentials",
    )
    parser.add_process_flags()
    return parser  # fmt: skip


_DEFAULT_LIMITS = ListenerLimits()


def _add_limit_flags(flag) -> None:
    """What one pod may cost the metadata listener (agent/limits.py); each limit hit is
    counted in podiam_agent_listener_limited_total{limit}."""
    d = _DEFAULT_LIMITS
    flag(
        "--max-connections-per-ip",
        env="PODIAM_MAX_CONNECTIONS_PER_IP",
        type=_positive_int,
        default=str(d.connections_per_ip),
        help="connections one source IP (a pod) may hold open; more are reset at once",
    )
    flag(
        "--max-connections",
        env="PODIAM_MAX_CONNECTIONS",
        type=_positive_int,
        default=str(d.connections),
        help="connections from all pods together; lowered to stay 128 below the open-files "
        "limit (which the agent raises to its hard limit)",
    )
    flag(
        "--header-timeout",
        env="PODIAM_HEADER_TIMEOUT",
        type=duration,
        default=f"{d.header_timeout:g}s",
        help="time a connection has to send a request's headers (from its first byte, or "
        "from the connection for its first request); then 408 and closed",
    )
    flag(
        "--keepalive-timeout",
        env="PODIAM_KEEPALIVE_TIMEOUT",
        type=duration,
        default=f"{d.keepalive_timeout:g}s",
        help="how long an idle keep-alive connection is kept open",
    )
    flag(
        "--max-header-bytes",
        env="PODIAM_MAX_HEADER_BYTES",
        type=_positive_int,
        default=str(d.header_bytes),
        help="request line and headers together, in bytes; more is 431",
    )
    flag(
        "--max-body-bytes",
        env="PODIAM_MAX_BODY_BYTES",
        type=_non_negative_int,
        default=str(d.body_bytes),
        help="request body, in bytes (the metadata API takes none); more is 413",
    )
    flag(
        "--pod-requests-per-second",
        env="PODIAM_POD_REQUESTS_PER_SECOND",
        type=_non_negative_float,
        default=f"{d.pod_rate:g}",
        help="each pod's fair share of requests: a token bucket refilled this fast (far above "
        "what SDKs ask: a few requests per credential refresh); over it, 429 with Retry-After. "
        "0 turns the bucket off",
    )
    flag(
        "--pod-request-burst",
        env="PODIAM_POD_REQUEST_BURST",
        type=_positive_int,
        default=str(d.pod_burst),
        help="requests a pod may make at once before --pod-requests-per-second applies",
    )


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a number above 0")
    return value


def _non_negative_int(text: str) -> int:
    text = text.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 9:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a whole number")
    return int(text)


def _non_negative_float(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        value = -1.0
    if not 0 <= value < 1e9:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a number, 0 or more")
    return value


def ipv4_port(text: str) -> tuple[str, int]:
    host, sep, number = text.strip().rpartition(":")
    try:
        address = ipaddress.IPv4Address(host)
        value = int(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 address:port") from None
    if not sep or not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 address:port")
    return str(address), value


def _interface(text: str) -> str:
    if not _INTERFACE.match(text.strip()):
        raise argparse.ArgumentTypeError(
            f"invalid interface {text!r}: expected a name like eni+, cali+, !docker0"
        )
    return text.strip()


def _optional_path(text: str) -> Path | None:
    return Path(text.strip()) if text.strip() else None


def _regexp(text: str) -> re.Pattern[str]:
    try:
        pattern = re.compile(text)
    except re.error as error:
        raise argparse.ArgumentTypeError(f"invalid regular expression {text!r}: {error}") from error
    dead = _dead_alternative(text)
    if dead is not None:
        # kiam searched for its pattern anywhere in the path; podiam matches the whole path,
        # so a kiam-style 'meta-data/hostname' would silently allow nothing.
        what = repr(text) if dead == text else f"{text!r}: the alternative {dead!r}"
        raise argparse.ArgumentTypeError(
            f"{what} can never match: the pattern must match the whole path, which starts "
            f"with /latest/ (kiam searched within the path){_hint(dead)}"
        )
    return pattern


# Characters with a meaning in a regular expression; any other character stands for itself.
_SPECIAL = set(".^$*+?{}[]\\|()")
_INLINE_FLAGS = re.compile(r"\(\?[aiLmsux-]+\)")
_GROUP = re.compile(r"\((?:\?:|\?P<\w+>)?")


def _dead_alternative(text: str) -> str | None:
    """An alternative of ``text`` that begins with a literal character other than "/", if any.

    Every path the agent sees begins with "/", so such an alternative can never take part in a
    match. Only what is certain is reported: an alternative beginning with anything else
    (".", a class, an escape, a lookaround) is left alone.
    """
    for branch in _alternatives(text):
        rest = branch
        while True:
            rest = rest.lstrip("^")
            flags = _INLINE_FLAGS.match(rest)
            if flags:
                rest = rest[flags.end() :]
            elif rest.startswith("\\A"):
                rest = rest[2:]
            else:
                break
        # A plain, non-capturing or named group: look inside (not into lookarounds).
        opener = _GROUP.match(rest)
        if opener and (opener.end() > 1 or not rest.startswith("(?")):
            inner = _group_body(rest, opener.end())
            if inner is not None and _dead_alternative(inner) is not None:
                return branch
        elif rest and rest[0] not in _SPECIAL and rest[0] != "/":
            return branch
    return None


def _alternatives(text: str) -> list[str]:
    """``text`` split at its top-level ``|`` (not inside groups, classes or escapes)."""
    parts, depth, start, i, in_class = [], 0, 0, 0, False
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 1
        elif in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
            if text[i + 1 : i + 2] == "^":
                i += 1
            if text[i + 1 : i + 2] == "]":  # a leading ] is a literal in the class
                i += 1
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "|" and depth == 0:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


def _group_body(text: str, start: int) -> str | None:
    """The text of the group opened before ``start`` up to its closing parenthesis."""
    depth, i, in_class = 1, start, False
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 1
        elif in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    return None


def _hint(dead: str) -> str:
    """A suggestion for a plain alternative such as kiam's ``meta-data/hostname``."""
    body = dead.lstrip("^")
    if not re.fullmatch(r"[\w/.-]+[$]?", body):
        return ""
    return f"; write {'^/' + body if body.startswith('latest/') else '^/latest/' + body!r}"


def parse_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> AgentConfig:
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    try:
        host = str(ipaddress.ip_address(args.host.strip()))
    except ValueError:
        parser.error(f"--host {args.host!r} is not an IP address")
    if not args.metadata_endpoint.startswith(("http://", "https://")):
        parser.error("--metadata-endpoint must be an http:// or https:// URL")
    if not 0 < args.pod_wait.total_seconds() <= 30:
        parser.error("--pod-wait must lie between 0 and 30s")
    node_name = args.node_name.strip()
    if node_name and (len(node_name) > 253 or not _NODE_NAME.fullmatch(node_name)):
        parser.error(f"--node-name {node_name!r} is not a Kubernetes node name")
    try:
        parse_addresses(args.server_address.strip())
    except ValueError as error:
        parser.error(f"--server-address must be host:port[,host:port...]: {error}")
    if not 0 <= args.stale_grace.total_seconds() <= 3600:
        parser.error("--stale-grace must lie between 0 and 1h")
    for name in ("header_timeout", "keepalive_timeout"):
        if not 0 < getattr(args, name).total_seconds() <= 3600:
            parser.error(f"--{name.replace('_', '-')} must lie between 0 and 1h")
    limits = ListenerLimits(
        connections_per_ip=args.max_connections_per_ip,
        connections=args.max_connections,
        header_timeout=args.header_timeout.total_seconds(),
        keepalive_timeout=args.keepalive_timeout.total_seconds(),
        header_bytes=args.max_header_bytes,
        body_bytes=args.max_body_bytes,
        pod_rate=args.pod_requests_per_second,
        pod_burst=args.pod_request_burst,
    )
    return AgentConfig(
        host=host,
        node_name=node_name,
        port=args.port,
        server_address=args.server_address.strip(),
        cert=args.cert,
        key=args.key,
        ca=args.ca,
        iptables=args.iptables,
        host_interface=args.host_interface,
        conntrack=args.conntrack.strip(),
        ready_file=args.ready_file,
        allow_route_regexp=args.allow_route_regexp,
        metadata_endpoint=args.metadata_endpoint.rstrip("/"),
        pod_wait=args.pod_wait,
        stale_grace=args.stale_grace,
        require_imdsv2=args.require_imdsv2,
        limits=limits,
        prometheus_listen_addr=args.prometheus_listen_addr,
        token_endpoint=args.token_endpoint,
        token_address=args.token_address,
        token_port=args.token_port,
        log_level=args.log_level,
        json_log=args.json_log,
    )
