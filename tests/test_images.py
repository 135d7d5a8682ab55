"""The images, built with podman and run the way the Helm chart runs them.

tests/test_packaging.py reads the Dockerfiles; here they are built (``images/build.sh``) and
run. The server container runs with the chart's security context (uid 65532, read-only root
filesystem, no capabilities, no privilege escalation, a tmpfs where the chart mounts an
emptyDir) in a node namespace, and serves real gRPC over mutual TLS to the agent container,
which runs with its node's network and only the capabilities the chart grants, installs its
DNAT rule, and answers a pod's boto3 — against the test STS and Kubernetes API.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.support.containers import (
    ImageCluster,
    Images,
    as_secret,
    build_images,
    capabilities_of,
    capability_mask,
    chart_pod,
    podman,
    requires_podman,
    run_flags,
)
from tests.support.e2e import AGENT_PORT, REPO, WHO_AM_I
from tests.support.netns import requires_root
from tests.test_packaging import OCI_LABELS, SERVER_ONLY

pytestmark = [requires_podman, requires_root]

COMPONENTS = ("agent", "server")
SITE_PACKAGES = "/opt/podiam/lib/python3.11/site-packages"
# Beyond their base and /opt/podiam, the images hold only the podiam user (its account files'
# backups, and the login records useradd touches) and what dpkg installs for the agent.
ACCOUNT_FILES = {
    "/etc/passwd-", "/etc/group-", "/etc/shadow-", "/etc/gshadow-",
    "/var/log/lastlog", "/var/log/faillog",
}  # fmt: skip
# Written by the agent's packages' maintainer scripts rather than shipped in them.
MAINTAINER_FILES = {"/etc/networks"}  # netbase's postinst
DPKG_STATE = re.compile(
    r"^/(var/lib/dpkg|var/cache/debconf|var/lib/apt|var/cache/apt|var/cache/ldconfig"
    r"|etc/alternatives|var/lib/systemd|var/log/apt|var/log/dpkg)(/|$)|^/etc/ld\.so\.cache$"
)
MAX_AGENT_GROWTH_MB = 150


@pytest.fixture(scope="module")
def images() -> Images:
    return build_images()


def image_of(images: Images, component: str) -> str:
    return images.agent if component == "agent" else images.server


def run_in(image: str, *argv: str, entrypoint: str, user: str = "0") -> str:
    result = podman(
        "run", "--rm", "--pull=never", "--network=none", f"--user={user}",
        f"--entrypoint={entrypoint}", image, *argv, timeout=120,
    )  # fmt: skip
    return result.stdout


def listing(image: str) -> set[str]:
    """Every path in the image's own filesystem (not the runtime's mounts)."""
    return set(links(image))


def links(image: str) -> dict[str, str]:
    """Every path in the image's own filesystem, with its symbolic link's target ("" if none)."""
    out = run_in(image, "/", "-xdev", "-printf", "%p\\t%l\\n", entrypoint="find")
    return dict(line.split("\t", 1) for line in out.splitlines())


def dpkg_packages(image: str) -> set[str]:
    return set(run_in(image, "-W", "-f=${Package}\\n", entrypoint="dpkg-query").split())


def dpkg_files(image: str, packages: set[str]) -> set[str]:
    if not packages:
        return set()
    return set(run_in(image, "-L", *sorted(packages), entrypoint="dpkg-query").splitlines())


# ---------------------------------------------------------------- the images themselves


@pytest.mark.parametrize("component", COMPONENTS)
def test_image_entry_point_prints_its_help(images, component):
    result = podman(
        "run", "--rm", "--pull=never", "--network=none", image_of(images, component), "--help"
    )  # fmt: skip
    assert result.stdout.startswith(f"usage: podiam-{component}")


@pytest.mark.parametrize("component", COMPONENTS)
def test_image_carries_the_oci_labels_of_its_commit(images, component):
    (inspected,) = json.loads(podman("image", "inspect", image_of(images, component)).stdout)
    labels = inspected["Labels"]
    assert set(labels) >= OCI_LABELS
    assert labels["org.opencontainers.image.title"] == f"podiam-{component}"
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert labels["org.opencontainers.image.revision"] == (head or "unknown")
    assert inspected["Config"]["User"] == "65532:65532"


@pytest.mark.parametrize("component", COMPONENTS)
def test_image_holds_only_its_base_its_virtualenv_and_its_packages(images, component):
    image = image_of(images, component)
    paths = links(image)
    added = set(paths) - listing(images.base)
    new_packages = dpkg_packages(image) - dpkg_packages(images.base)
    packaged = dpkg_files(image, new_packages)
    rest = sorted(
        path
        for path in added
        if not (path == "/opt/podiam" or path.startswith("/opt/podiam/"))
        and path not in ACCOUNT_FILES
        and path not in packaged
        and path not in MAINTAINER_FILES
        # update-alternatives' links (iptables -> its nft or legacy variant)
        and not paths[path].startswith("/etc/alternatives/")
        and not DPKG_STATE.search(path)
    )
    assert rest == [], f"{component} image holds more than its base, virtualenv and packages"
    if component == "server":
        assert new_packages == set()
    else:
        assert "iptables" in new_packages


@pytest.mark.parametrize("component", COMPONENTS)
def test_image_has_no_compiler_pip_caches_tests_or_bench_code(images, component):
    paths = listing(image_of(images, component))
    tools = r"(gcc|g\+\+|cc|c\+\+|clang|ld|as|make)(-[\d.]+)?"
    compilers = {p for p in paths if re.fullmatch(rf"(/usr)?(/local)?/s?bin/{tools}", p)}
    assert compilers == set()
    assert not {p for p in paths if "/.cache/" in p or p.endswith("/.cache")}
    assert not {p for p in paths if p.startswith("/opt/podiam/bin/pip")}
    # The build stage's sources and wheel stay in the build stage.
    assert not {p for p in paths if p.split("/")[1] in ("src", "wheels")}
    ours = {p.removeprefix(SITE_PACKAGES + "/").split("/")[0] for p in paths}
    assert not ours & {"tests", "bench"}
    assert f"{SITE_PACKAGES}/{'server' if component == 'agent' else 'agent'}" not in paths


def test_agent_image_has_no_server_libraries(images):
    probe = "import importlib.util, sys; print(*[m for m in sys.argv[1:] if importlib.util.find_spec(m)])"  # noqa: E501
    found = run_in(
        images.agent, "-c", probe, *SERVER_ONLY, entrypoint="python", user="65532"
    ).split()
    assert found == []


def image_mb(image: str) -> float:
    return int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout) / 1e6


def test_agent_image_adds_less_than_150_mb_to_its_base(images):
    growth = image_mb(images.agent) - image_mb(images.base)
    assert 0 < growth < MAX_AGENT_GROWTH_MB, f"the agent image adds {growth:.0f} MB"


# ---------------------------------------------------------------- run as the chart runs them


@pytest_asyncio.fixture(scope="module")
async def podiam(images) -> AsyncIterator[ImageCluster]:
    async with ImageCluster(images, workers=1, permitted={"apps": "app-.*"}) as cluster:
        yield cluster


async def test_pod_gets_its_role_through_the_agent_and_server_containers(podiam):
    pod = podiam.add_pod(0, "apps", "web", "app-web")
    result = await pod.run("python", "-c", WHO_AM_I, podiam.sts_url)
    assert result.returncode == 0, result.stderr + podiam.logs()
    answer = json.loads(result.stdout)
    # botocore's instance-metadata provider found them, and STS says they are the pod's role.
    assert answer["method"] == "iam-role", answer
    assert answer["arn"].startswith("arn:aws:sts::123456789012:assumed-role/app-web/"), answer


async def test_pod_outside_its_namespaces_permission_is_refused(podiam):
    pod = podiam.add_pod(0, "apps", "rogue", "admin")
    result = await pod.run("python", "-c", WHO_AM_I, podiam.sts_url)
    answer = json.loads(result.stdout)
    assert answer["arn"] is None, answer


async def test_agent_container_installs_its_dnat_rule_in_its_node(podiam):
    node = podiam.worker(0)
    (rule,) = podiam.agent(node).dnat_rules()
    assert "-i eni+" in rule
    assert f"--to-destination {node.ip}:{AGENT_PORT}" in rule


async def test_server_container_runs_as_the_charts_non_root_user_without_capabilities(podiam):
    server = podiam.server
    status = capabilities_of(server.pid())
    assert (status["Uid"], status["Gid"]) == (65532, 65532)
    assert status["CapEff"] == status["CapPrm"] == status["CapBnd"] == 0
    assert status["NoNewPrivs"] == 1
    assert status["Seccomp"] == 2  # the runtime's default filter, as RuntimeDefault asks


async def test_server_container_writes_only_to_the_charts_tmp_volume(podiam):
    server = podiam.server
    assert server.inspect()["HostConfig"]["ReadonlyRootfs"] is True
    for place in ("/opt/podiam", "/etc/podiam/tls", "/run", "/var/tmp", "/"):
        refused = server.exec("touch", f"{place}/probe")
        assert refused.returncode != 0
        assert "Read-only file system" in refused.stderr, (place, refused.stderr)
    assert server.exec("touch", "/tmp/probe").returncode == 0
    # The program itself wrote nothing outside its volumes either: the only changes to the
    # root filesystem are the mount points the runtime made for the volumes.
    mounts = {mount["Destination"] for mount in server.inspect()["Mounts"]}
    made = mounts | {str(parent) for mount in mounts for parent in Path(mount).parents}
    changed = json.loads(podman("diff", "--format", "json", server.name).stdout or "{}")
    assert {path for paths in changed.values() for path in paths} - made == set()


async def test_charts_probes_pass_in_the_server_container(podiam):
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert await podiam.server.probe(probe), probe


async def test_charts_probes_pass_for_the_agent_container(podiam):
    for probe in ("readinessProbe", "livenessProbe"):
        assert await podiam.agent(0).probe(probe), probe


async def test_agent_container_holds_net_admin_and_net_raw_and_nothing_else(podiam):
    agent = podiam.agent(0)
    status = capabilities_of(agent.pid())
    wanted = capability_mask("NET_ADMIN", "NET_RAW")
    assert status["Uid"] == 0
    assert status["CapEff"] == status["CapPrm"] == status["CapBnd"] == wanted
    assert status["NoNewPrivs"] == 1
    assert agent.inspect()["HostConfig"]["ReadonlyRootfs"] is True


# A rule for a test address, added and removed again: what the agent does with its own rule.
PROBE_RULE = "-d 169.254.169.254/32 -p tcp --dport 80 -j DNAT --to-destination 10.9.9.9:8181"


def iptables_in_agent_container(podiam, backend: str, tmp_path: Path, *, drop: str = "") -> str:
    """Run ``backend`` (iptables-nft or -legacy) in the agent image as the chart runs the agent,
    less capability ``drop``, in the server's node (where no agent's rule is): its output."""
    pod = chart_pod("DaemonSet")
    secrets = {"tls": as_secret(podiam.agent_tls(), tmp_path / "tls")}
    flags = run_flags(pod, secrets=secrets, node=podiam.server_node, scratch=tmp_path)
    flags = [flag for flag in flags if not (drop and flag == f"--cap-add={drop}")]
    script = (
        f"{backend} -w 5 -t nat -A PREROUTING {PROBE_RULE}"
        f" && {backend} -w 5 -t nat -D PREROUTING {PROBE_RULE} && echo changed"
    )
    result = podman(
        "run", "--rm", "--pull=never", f"--network=ns:/run/netns/{podiam.server_node.name}",
        *flags, "--entrypoint=sh", podiam.images.agent, "-c", script, check=False,
    )  # fmt: skip
    return result.stdout + result.stderr


@pytest.mark.parametrize("backend", ["iptables-nft", "iptables-legacy"])
def test_chart_grants_the_agent_what_either_iptables_backend_needs(podiam, backend, tmp_path):
    assert "changed" in iptables_in_agent_container(podiam, backend, tmp_path)


def test_legacy_iptables_is_why_the_chart_grants_net_raw(podiam, tmp_path):
    # nf_tables needs NET_ADMIN alone; iptables-legacy's raw socket needs NET_RAW too.
    without = iptables_in_agent_container(podiam, "iptables-nft", tmp_path / "nft", drop="NET_RAW")
    assert "changed" in without
    legacy = iptables_in_agent_container(
        podiam, "iptables-legacy", tmp_path / "legacy", drop="NET_RAW"
    )
    assert "changed" not in legacy
    assert "Permission denied" in legacy


async def test_agent_container_without_iptables_runs_unprivileged(images):
    # agent.iptables=false: the chart runs the agent as the image's user with no capabilities.
    values = {"agent": {"iptables": False}}
    async with ImageCluster(images, workers=1, values=values) as cluster:
        agent = cluster.agent(0)
        status = capabilities_of(agent.pid())
        assert (status["Uid"], status["Gid"]) == (65532, 65532)
        assert status["CapEff"] == status["CapPrm"] == status["CapBnd"] == 0
        assert status["NoNewPrivs"] == 1
        # Ready (its deep health check passed against the server container), and no rule.
        assert agent.dnat_rules() == []


async def test_containers_exit_cleanly_when_stopped_as_the_kubelet_stops_them(images):
    # The program is the container's PID 1, which gets no default signal handling: the kubelet's
    # SIGTERM must still end it cleanly (not after the grace period, by SIGKILL).
    async with ImageCluster(images, workers=1) as cluster:
        assert await cluster.agent(0).stop() == 0, cluster.logs()
        assert await cluster.server.stop() == 0, cluster.logs()
