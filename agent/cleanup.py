"""``podiam-agent cleanup``: remove the metadata DNAT rule, which no agent removes by itself.

The rule outlives every agent process on purpose (a restart or an upgrade must never let pods
reach the node's own metadata service), so taking podiam off a node is a separate, explicit
step: after it, pods reach the real metadata service — the node's role — again. It removes
every ``nat PREROUTING`` DNAT rule for 169.254.169.254:80 that points at the agent's port, on
whatever node IP and interface, so rules from earlier configurations go too. Running it again,
or where there is no rule, changes nothing and succeeds.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Mapping, Sequence

from agent.config import ipv4_port
from agent.iptables import IptablesError, remove_metadata_rules
from runtime.flags import EnvDefaultsParser, host_port


def build_parser(environ: Mapping[str, str] | None = None) -> EnvDefaultsParser:
    parser = EnvDefaultsParser(
        prog="podiam-agent cleanup",
        description=(
            "Remove the iptables DNAT rule(s) that send pods' requests for 169.254.169.254:80 to "
            "the podiam agent, so pods reach the node's real metadata service (and the node's "
            "IAM role) again. Run on each node when uninstalling podiam; needs NET_ADMIN. "
            "Exits 0 when there was nothing to remove."
        ),
        environ=environ,
    )
    parser.add_flag(
        "--port",
        env="PODIAM_PORT",
        type=_port,
        default="8181",
        help="the agent's port: rules whose --to-destination ends in this port are removed",
    )
    parser.add_flag(
        "--token-port",
        env="PODIAM_TOKEN_PORT",
        type=_port,
        default="8182",
        help="the agent's --token-port: DNAT rules for --token-address to it are removed too",
    )
    parser.add_flag(
        "--token-address",
        env="PODIAM_TOKEN_ADDRESS",
        type=ipv4_port,
        default="169.254.170.23:80",
        help="the agent's --token-address (token-bound credentials)",
    )
    parser.add_flag(
        "--iptables-binary",
        env="PODIAM_IPTABLES_BINARY",
        default="iptables",
        help="the iptables command",
    )
    return parser


def _port(text: str) -> int:
    _, port = host_port(f"x:{text}")
    if port == 0:
        raise argparse.ArgumentTypeError("the port must be from 1 to 65535")
    return port


def main(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> int:
    args = build_parser(environ).parse_args(argv)
    token_ip, token_port = args.token_address

    async def remove() -> list[str]:
        removed = await remove_metadata_rules(port=args.port, iptables=args.iptables_binary)
        # The token-bound endpoint's rule: left behind it would keep 169.254.170.23 from the
        # EKS Pod Identity agent, should the add-on be installed later.
        removed += await remove_metadata_rules(
            port=args.token_port, metadata_ip=token_ip, metadata_port=token_port,
            iptables=args.iptables_binary,
        )  # fmt: skip
        return removed

    try:
        removed = asyncio.run(remove())
    except IptablesError as error:
        print(f"podiam-agent cleanup: {error}", file=sys.stderr)
        return 1
    if not removed:
        print(f"no podiam DNAT rule for 169.254.169.254:80 to port {args.port}; nothing to do")
    for rule in removed:
        print(f"removed: iptables -t nat {rule.replace('-A ', '-D ', 1)}")
    if removed:
        print("pods on this node now reach the node's own metadata service")
    return 0
