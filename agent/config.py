"""``podiam-agent`` flags: parsing and validation, testable without starting anything."""

from __future__ import annotations

import argparse
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from agent.proxy import DEFAULT_ALLOW_ROUTE_REGEXP
from server.flags import EnvDefaultsParser, duration, host_port

_INTERFACE = re.compile(r"^!?[A-Za-z0-9_.:+-]{1,15}$")


@dataclass(frozen=True, slots=True)
class AgentConfig:
    host: str
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
    require_imdsv2: bool
    prometheus_listen_addr: tuple[str, int] | None
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
    flag("--port", env="PODIAM_PORT", type=_port, default="8181", help="port of the metadata API")
    flag(
        "--server-address",
        env="PODIAM_SERVER_ADDRESS",
        default="podiam-server:443",
        help="podiam server host:port; a DNS name with several addresses (a headless "
        "Service) is balanced round-robin",
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
        default="http://169.254.169.254",
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
        "--require-imdsv2",
        env="PODIAM_REQUIRE_IMDSV2",
        action="store_true",
        help="refuse credential requests without a valid IMDSv2 token",
    )
    parser.add_process_flags()
    return parser  # fmt: skip


def _port(text: str) -> int:
    _, port = host_port(f"x:{text}")
    return port


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
        return re.compile(text)
    except re.error as error:
        raise argparse.ArgumentTypeError(f"invalid regular expression {text!r}: {error}") from error


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
    if ":" not in args.server_address.strip():
        parser.error("--server-address must be host:port")
    return AgentConfig(
        host=host,
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
        require_imdsv2=args.require_imdsv2,
        prometheus_listen_addr=args.prometheus_listen_addr,
        log_level=args.log_level,
        json_log=args.json_log,
    )
