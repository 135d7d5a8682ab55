"""The metrics the dashboard and the alerts are built on, each moved by the event it names: a new
pod's wait for its first credentials, credentials an agent holds close to expiry, and the
certificates' expiry — over a real server, agent, moto and the Kubernetes API test server."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import aiohttp
import pytest
from cryptography import x509
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from server.first_credentials import FirstCredentialsTimer
from server.pods import PodRecord
from tests.support.pods import add_pod
from tests.support.server import BASE_ARN
from tests.support.waiting import eventually


@pytest.fixture(scope="module")
def namespaces():
    return {"apps": "app-.*"}


def first_credentials_count() -> float:
    return REGISTRY.get_sample_value("podiam_pod_first_credentials_seconds_count") or 0.0


async def agent_metrics(agent) -> dict[tuple[str, tuple], float]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{agent.metrics_port}/metrics") as response:
            text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_new_pod_is_timed_from_first_seen_to_credentials_at_its_agent(agent, kube, sts):
    before = first_credentials_count()
    ip = add_pod(kube, "apps", "fresh", "app-fresh")
    await eventually(lambda: agent.state.usable_entry(ip) is not None)
    await eventually(lambda: first_credentials_count() == before + 1)
    # Later updates of the same pod, and other pods' credentials, do not time it again.
    kube.update_pod("apps", "fresh", labels={"changed": "yes"})
    add_pod(kube, "apps", "other", "app-other")
    await eventually(lambda: first_credentials_count() == before + 2)
    await asyncio.sleep(0.3)
    assert first_credentials_count() == before + 2


async def test_denied_pod_is_never_timed(agent, kube):
    before = first_credentials_count()
    ip = add_pod(kube, "apps", "intruder", "admin")
    await eventually(lambda: agent.state.usable_entry(ip) is not None)
    await asyncio.sleep(0.3)
    assert first_credentials_count() == before


def test_pods_listed_before_the_server_was_ready_are_not_timed():
    now = [100.0]
    timer = FirstCredentialsTimer(clock=lambda: now[0])
    listed, new = _pod("listed"), _pod("new")
    before = first_credentials_count()
    timer.active(listed)  # during the first list
    timer.arm()
    timer.active(new)
    now[0] += 2.5
    timer.served(listed)
    timer.served(new)
    timer.served(new)  # served again: already timed
    assert first_credentials_count() == before + 1


def test_pods_on_nodes_this_replica_does_not_stream_to_keep_no_timestamp():
    timer = FirstCredentialsTimer(streams=lambda host_ip: 0)
    timer.arm()
    before = first_credentials_count()
    timer.active(_pod("elsewhere"))
    timer.served(_pod("elsewhere"))  # e.g. by a unary call: this replica never started a clock
    assert first_credentials_count() == before


async def test_agent_counts_credentials_it_holds_with_under_30_minutes_left(agent, kube, sts):
    key = ("podiam_agent_credentials_expiring", ())
    assert (await agent_metrics(agent))[key] == 0
    # STS hands this role 10-minute sessions: the agent holds credentials SDKs call expiring.
    sts.shorten_sessions(BASE_ARN + "app-short", 600)
    ip = add_pod(kube, "apps", "short-lived", "app-short")
    await eventually(lambda: agent.state.usable_entry(ip) is not None)

    async def counted() -> bool:
        return (await agent_metrics(agent))[key] == 1

    await eventually(counted)


async def test_both_programs_report_when_their_certificates_expire(agent, podiam, tls_dirs):
    samples = await agent_metrics(agent)
    for certificate, path in (("agent", tls_dirs.agent.cert), ("ca", tls_dirs.agent.ca)):
        expected = _not_after(path)
        name = "podiam_agent_certificate_expiry_timestamp_seconds"
        assert samples[(name, (("certificate", certificate),))] == expected
    server = REGISTRY.get_sample_value(
        "podiam_server_certificate_expiry_timestamp_seconds", {"certificate": "server"}
    )
    assert server == _not_after(tls_dirs.server.cert)
    assert datetime.fromtimestamp(server, UTC) > datetime.now(UTC)


def _not_after(path) -> float:
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc.timestamp()


def _pod(name: str) -> PodRecord:
    return PodRecord(
        uid=f"uid-{name}",
        namespace="apps",
        name=name,
        ip="10.0.0.9",
        host_ip="10.0.0.1",
        phase="Running",
        host_network=False,
        role="app-x",
        external_id="",
        session_name="",
    )
