"""The metadata DNAT rule, with real iptables inside network namespaces (never the host's).

``MetadataRedirect`` runs iptables in its own network namespace; here its ``iptables`` binary is
a two-line shim that runs the real one inside a node's namespace, so the code under test is the
code the agent runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.iptables import (
    NET_ADMIN_MESSAGE,
    IptablesError,
    MetadataRedirect,
    check_can_manage,
    remove_metadata_rules,
)
from tests.support.netns import Cluster, Netns, Node, demand, requires_root, requires_tools

METADATA_URL = "http://169.254.169.254/latest/meta-data/x"
AGENT_PORT = 8181
REPO = Path(__file__).resolve().parent.parent
# iptables-legacy's lock; iptables-nft accepts -w but takes no lock.
XTABLES_LOCK = os.environ.get("XTABLES_LOCKFILE", "/run/xtables.lock")


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with Cluster() as cluster:
        yield cluster


def shim(tmp_path: Path, ns: Netns, binary: str = "iptables") -> str:
    """An executable that runs ``binary`` inside ``ns`` with the arguments it is given."""
    path = tmp_path / f"{binary}-in-{ns.name}"
    path.write_text(f'#!/bin/sh\nexec ip netns exec {ns.name} {binary} "$@"\n')
    path.chmod(0o755)
    return str(path)


def redirect(tmp_path: Path, node: Node, binary: str = "iptables", **kw: Any) -> MetadataRedirect:
    """The agent's rule for ``node``, managed by running ``binary`` inside it."""
    return MetadataRedirect(
        host=node.ip, port=AGENT_PORT, iptables=shim(tmp_path, node, binary), **kw
    )


def nat_rules(ns: Netns, binary: str = "iptables") -> list[str]:
    out = ns.run(binary, "-w", "5", "-t", "nat", "-S", "PREROUTING").stdout
    return [line for line in out.splitlines() if line.startswith("-A ")]


# ---------------------------------------------------------------- the rule as written


def test_rule_is_the_documented_dnat_from_pod_interfaces() -> None:
    rule = MetadataRedirect(host="10.0.1.5", port=8181)
    assert rule.rule_args() == [
        "-p", "tcp", "-d", "169.254.169.254", "--dport", "80",
        "-i", "eni+", "-j", "DNAT", "--to-destination", "10.0.1.5:8181",
    ]  # fmt: skip


@pytest.mark.parametrize("interface", ["!docker0", "! docker0"])
def test_leading_bang_inverts_the_interface_match(interface: str) -> None:
    args = MetadataRedirect(host="10.0.1.5", port=8181, interface=interface).rule_args()
    assert args[6:9] == ["!", "-i", "docker0"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("host", ""),
        ("host", "node-1.internal"),
        ("host", "10.0.0.1; reboot"),
        ("host", "::1"),
        ("port", 0),
        ("port", 65536),
        ("port", True),
        ("interface", ""),
        ("interface", "!"),
        ("interface", "eni +"),
        ("interface", "eni$(id)"),
        ("interface", "-j"),
        ("interface", "a-very-long-interface-name"),
        ("metadata_port", 0),
        ("iptables", ""),
    ],
)
def test_unsafe_or_malformed_settings_are_refused(field: str, value: object) -> None:
    settings: dict[str, object] = {"host": "10.0.1.5", "port": 8181, field: value}
    with pytest.raises(ValueError, match=field):
        MetadataRedirect(**settings)  # type: ignore[arg-type]


async def test_missing_iptables_binary_is_reported_in_one_line() -> None:
    with pytest.raises(IptablesError, match=r"^iptables not found") as error:
        await check_can_manage(iptables="/nonexistent/iptables")
    assert "\n" not in str(error.value)
    rule = MetadataRedirect(host="10.0.1.5", port=8181, iptables="/nonexistent/iptables")
    with pytest.raises(IptablesError, match=r"^iptables not found"):
        await rule.install()


# ---------------------------------------------------------------- install and remove


@requires_root
async def test_install_adds_exactly_one_rule_and_a_restart_keeps_one(
    cluster: Cluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = cluster.node("a")
    caplog.set_level(logging.INFO, logger="agent.iptables")
    assert await redirect(tmp_path, node).install() is True
    assert nat_rules(node) == [
        f"-A PREROUTING -d 169.254.169.254/32 -i eni+ -p tcp -m tcp --dport 80 "
        f"-j DNAT --to-destination {node.ip}:{AGENT_PORT}"
    ]
    # An agent restart builds a new object and installs again.
    restarted = redirect(tmp_path, node)
    assert await restarted.present() is True
    assert await restarted.install() is False
    assert len(nat_rules(node)) == 1
    added = [r.getMessage() for r in caplog.records if r.name == "agent.iptables"]
    assert len(added) == 1 and added[0].startswith("iptables: added -t nat -A PREROUTING")


@requires_root
async def test_remove_deletes_the_rule_and_is_a_noop_when_absent(
    cluster: Cluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = cluster.node("a")
    rule = redirect(tmp_path, node)
    await rule.install()
    caplog.set_level(logging.INFO, logger="agent.iptables")
    assert await rule.remove() is True
    assert nat_rules(node) == []
    assert await rule.present() is False
    assert await rule.remove() is False
    removed = [r.getMessage() for r in caplog.records if r.name == "agent.iptables"]
    assert len(removed) == 1 and removed[0].startswith("iptables: removed")


@requires_root
async def test_remove_deletes_every_copy_and_nothing_else(cluster: Cluster, tmp_path: Path) -> None:
    node = cluster.node("a")
    rule = redirect(tmp_path, node)
    unrelated = ["-p", "tcp", "--dport", "8080", "-j", "REDIRECT", "--to-ports", "9090"]
    for spec in (rule.rule_args(), unrelated, rule.rule_args()):
        node.run("iptables", "-w", "5", "-t", "nat", "-A", "PREROUTING", *spec)
    assert len(nat_rules(node)) == 3
    assert await rule.remove() is True
    assert nat_rules(node) == [
        "-A PREROUTING -p tcp -m tcp --dport 8080 -j REDIRECT --to-ports 9090"
    ]


@requires_root
async def test_rules_for_another_agent_port_are_a_different_rule(
    cluster: Cluster, tmp_path: Path
) -> None:
    node = cluster.node("a")
    await redirect(tmp_path, node).install()
    other = MetadataRedirect(host=node.ip, port=9999, iptables=shim(tmp_path, node))
    assert await other.present() is False
    assert await other.remove() is False
    assert len(nat_rules(node)) == 1


@requires_root
async def test_cleanup_removes_every_metadata_rule_to_the_agent_port_and_nothing_else(
    cluster: Cluster, tmp_path: Path
) -> None:
    node = cluster.node("a")
    iptables = shim(tmp_path, node)
    # What agents of several configurations may have left: other interfaces, an old node IP.
    for agent in (
        MetadataRedirect(host=node.ip, port=AGENT_PORT),
        MetadataRedirect(host=node.ip, port=AGENT_PORT, interface="!docker0"),
        MetadataRedirect(host="10.9.9.9", port=AGENT_PORT, interface="cali+"),
    ):
        node.run("iptables", "-w", "5", "-t", "nat", "-A", "PREROUTING", *agent.rule_args())
    keep = [
        # Another program's metadata redirect to another port, and unrelated DNAT.
        MetadataRedirect(host=node.ip, port=9999).rule_args(),
        ["-p", "tcp", "-d", "10.1.1.1", "--dport", "80", "-j", "DNAT",
         "--to-destination", f"{node.ip}:{AGENT_PORT}"],
        ["!", "-d", "169.254.169.254", "-p", "tcp", "--dport", "80", "-j", "DNAT",
         "--to-destination", f"{node.ip}:{AGENT_PORT}"],
    ]  # fmt: skip
    for spec in keep:
        node.run("iptables", "-w", "5", "-t", "nat", "-A", "PREROUTING", *spec)
    before = nat_rules(node)

    removed = await remove_metadata_rules(port=AGENT_PORT, iptables=iptables)
    assert len(removed) == 3
    assert all(f":{AGENT_PORT}" in rule and "169.254.169.254/32" in rule for rule in removed)
    assert nat_rules(node) == [rule for rule in before if rule not in removed]
    assert len(nat_rules(node)) == len(keep)
    # Idempotent: nothing left to remove is not an error.
    assert await remove_metadata_rules(port=AGENT_PORT, iptables=iptables) == []


async def test_cleanup_without_iptables_is_one_clear_error() -> None:
    with pytest.raises(IptablesError, match=r"^iptables not found"):
        await remove_metadata_rules(port=AGENT_PORT, iptables="/nonexistent/iptables")


# ---------------------------------------------------------------- traffic


@requires_root
async def test_pod_metadata_request_reaches_the_agent_and_shows_the_pods_ip(
    cluster: Cluster, tmp_path: Path
) -> None:
    node = cluster.node("a")
    pod = node.add_pod("app")
    await node.serve_echo(node.ip, AGENT_PORT, label="agent-a")
    rule = redirect(tmp_path, node)

    before = await pod.fetch(METADATA_URL, timeout=1)
    assert before.status is None, "169.254.169.254 must be unreachable without the rule"

    await rule.install()
    reply = await pod.fetch(METADATA_URL)
    assert (reply.status, reply.body) == (200, f"agent-a {pod.ip} /latest/meta-data/x")
    # DNAT to the node's own LAN address needs no route_localnet.
    assert node.read_sysctl("net.ipv4.conf.all.route_localnet") == "0"

    await rule.remove()
    after = await pod.fetch(METADATA_URL, timeout=1)
    assert after.status is None


@requires_root
async def test_inverted_interface_redirects_every_interface_but_the_named_one(
    cluster: Cluster, tmp_path: Path
) -> None:
    node = cluster.node("a")
    pod = node.add_pod("app")
    docker_pod = node.add_pod("docker", host_interface="docker0")
    await node.serve_echo(node.ip, AGENT_PORT, label="agent-a")
    await redirect(tmp_path, node, interface="!docker0").install()

    assert "! -i docker0" in nat_rules(node)[0]
    reply = await pod.fetch(METADATA_URL)
    assert (reply.status, reply.body.split()[1]) == (200, pod.ip)
    excluded = await docker_pod.fetch(METADATA_URL, timeout=1)
    assert excluded.status is None


@requires_root
async def test_a_pod_only_ever_reaches_its_own_nodes_agent(
    cluster: Cluster, tmp_path: Path
) -> None:
    node_a, node_b = cluster.node("a"), cluster.node("b")
    pod_a, pod_b = node_a.add_pod("app"), node_b.add_pod("app")
    await node_a.serve_echo(node_a.ip, AGENT_PORT, label="agent-a")
    await node_b.serve_echo(node_b.ip, AGENT_PORT, label="agent-b")

    await redirect(tmp_path, node_b).install()
    stranded = await pod_a.fetch(METADATA_URL, timeout=1)
    assert stranded.status is None, "node B's agent must not answer a pod on node A"

    await redirect(tmp_path, node_a).install()
    reply_a, reply_b = await asyncio.gather(pod_a.fetch(METADATA_URL), pod_b.fetch(METADATA_URL))
    assert reply_a.body.split()[:2] == ["agent-a", pod_a.ip]
    assert reply_b.body.split()[:2] == ["agent-b", pod_b.ip]


# ---------------------------------------------------------------- the xtables lock


async def hold_xtables_lock(ns: Netns, seconds: float) -> asyncio.subprocess.Process:
    """Hold the xtables lock for ``seconds``; return once it is held."""
    holder = await ns.spawn(
        "flock", XTABLES_LOCK, "sh", "-c", f"echo held; sleep {seconds}",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert holder.stdout is not None
    assert await asyncio.wait_for(holder.stdout.readline(), 10) == b"held\n"
    return holder


@requires_tools("iptables-legacy", "flock")
async def test_install_waits_for_a_held_xtables_lock(cluster: Cluster, tmp_path: Path) -> None:
    demand("iptables-legacy", "flock")
    node = cluster.node("a")
    rule = redirect(tmp_path, node, "iptables-legacy")
    holder = await hold_xtables_lock(node, 1.5)
    started = asyncio.get_running_loop().time()
    assert await rule.install() is True
    waited = asyncio.get_running_loop().time() - started
    assert waited >= 1.0, f"install finished after {waited:.2f}s without waiting for the lock"
    assert len(nat_rules(node, "iptables-legacy")) == 1
    await holder.wait()


@requires_tools("iptables-legacy", "flock")
async def test_a_lock_held_too_long_gives_a_clear_error(cluster: Cluster, tmp_path: Path) -> None:
    demand("iptables-legacy", "flock")
    node = cluster.node("a")
    rule = redirect(tmp_path, node, "iptables-legacy", lock_wait_seconds=1)
    holder = await hold_xtables_lock(node, 3)
    with pytest.raises(IptablesError, match="xtables lock"):
        await rule.install()
    holder.kill()
    await holder.wait()


# ---------------------------------------------------------------- capabilities


# Run in a child process (so capabilities can be dropped): the start-up check, then an install,
# each printing "ok" or its one-line error.
_CHECK = """
import asyncio, sys
from agent.iptables import IptablesError, MetadataRedirect, check_can_manage
async def main():
    for step in (check_can_manage(), MetadataRedirect(host="10.0.0.1", port=8181).install()):
        try:
            await step
            print("ok")
        except IptablesError as error:
            print(error)
asyncio.run(main())
"""


def without_net_admin() -> list[str]:
    if shutil.which("setpriv"):
        return ["setpriv", "--inh-caps", "-net_admin", "--bounding-set", "-net_admin", "--"]
    if shutil.which("capsh"):
        return ["capsh", "--drop=cap_net_admin", "--"]  # then "-c" runs via /bin/sh
    pytest.skip("neither setpriv nor capsh is installed")


@requires_root
async def test_without_net_admin_the_start_up_check_and_install_say_so(
    cluster: Cluster,
) -> None:
    node = cluster.node("a")
    env = {"PYTHONPATH": str(REPO)}
    allowed = await node.arun(sys.executable, "-c", _CHECK, env=env)
    assert allowed.stdout.splitlines() == ["ok", "ok"], allowed.stderr

    prefix = without_net_admin()
    argv = [*prefix, sys.executable, "-c", _CHECK]
    if prefix[0] == "capsh":
        argv = [*prefix, "-c", f'exec "{sys.executable}" -c "$0"', _CHECK]
    denied = await node.arun(*argv, env=env)
    assert denied.stdout.splitlines() == [NET_ADMIN_MESSAGE] * 2, denied.stderr
