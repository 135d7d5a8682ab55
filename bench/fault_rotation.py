"""The fault suite's certificate rotation: the mutual-TLS files replaced under load.

Loopback, an in-process server and agent reading the same directory of files, as they would
read one Kubernetes Secret each (the chart's); pods with cached credentials ask throughout.
Two rotations, each left to the programs' own file watching (the server checks its files at
each handshake, the agent every 10 s): new leaf certificates from the same CA, as
cert-manager's renewal does, and then a new CA with new leaves, every file at once. After
each, a new pod (one the agent's state does not hold yet) must be served over the new
material. Counts: failed requests (target 0).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from bench import pod_load

NAMESPACE = "rotate"


async def run(section, options) -> None:
    from certs.authority import generate_bundle, generate_ca, write_bundle
    from certs.tls import TlsFiles
    from tests.support.agent import NODE, running_agent
    from tests.support.kubeapi import KubeApiServer
    from tests.support.moto_sts import MotoSts
    from tests.support.server import running_server
    from tests.support.tls import TlsDirs

    pods = [(f"127.0.214.{k + 1}", f"rotate-role-{k % 3}") for k in range(8)]
    seconds = options.rotation_load_seconds
    work = Path(tempfile.mkdtemp(prefix="podiam-faults-rotation-"))
    live = work / "live"
    ca = generate_ca(days=730)
    write_bundle(generate_bundle(ca=ca), live)
    tls = TlsDirs(
        good=live, foreign=live,
        server=TlsFiles.server_in(live), agent=TlsFiles.agent_in(live),
        foreign_agent=TlsFiles.agent_in(live), foreign_server=TlsFiles.server_in(live),
    )  # fmt: skip
    kube, sts = KubeApiServer(), MotoSts()
    await kube.start()
    await asyncio.to_thread(sts.start)
    rows = []
    try:
        kube.add_namespace(NAMESPACE, annotations={"iam.amazonaws.com/permitted": ".*"})
        for k, (ip, role) in enumerate(pods):
            kube.add_pod(NAMESPACE, f"r-{k}", ip=ip, host_ip=NODE,
                         annotations={"iam.amazonaws.com/role": role})  # fmt: skip
        async with running_server(kube, sts, tls, work) as served:
            async with running_agent(
                server_port=served.server.port, tls=tls, metadata="http://127.0.0.1:9"
            ) as agent:
                await asyncio.wait_for(agent.streams.synced_once.wait(), 15)
                for ip, role in pods:
                    if not await pod_load.served(agent.port, ip, role, within=10):
                        raise RuntimeError(f"pod {ip} not served before the rotation")
                load = pod_load.PodLoad(agent.port, pods)
                load.start()
                newcomer = 0
                for what, bundle in (
                    ("new leaf certificates, same CA", lambda: generate_bundle(ca=ca)),
                    ("new CA and leaves, every file at once", generate_bundle),
                ):
                    before = dict(load.outcomes)
                    old_channel = agent.connection.channel
                    await asyncio.sleep(seconds / 4)
                    write_bundle(bundle(), live, force=True)
                    changed = time.monotonic()
                    while agent.connection.channel is old_channel:
                        if time.monotonic() - changed > 60:
                            raise RuntimeError("the agent did not reload its TLS files in 60 s")
                        await asyncio.sleep(0.05)
                    moved = time.monotonic() - changed
                    newcomer += 1
                    ip, role = f"127.0.215.{newcomer}", "rotate-new"
                    kube.add_pod(NAMESPACE, f"new-{newcomer}", ip=ip, host_ip=NODE,
                                 annotations={"iam.amazonaws.com/role": role})  # fmt: skip
                    new_ok = await pod_load.served(agent.port, ip, role, within=10)
                    await asyncio.sleep(max(0.0, seconds * 3 / 4 - moved))
                    rows.append((what, load.since(before), moved, new_ok))
                await load.stop()
    finally:
        await asyncio.to_thread(sts.stop)
        await kube.stop()
    table = section.table(
        f"Certificate rotation under load (loopback; {len(pods)} pods with cached credentials "
        "asking throughout; the agent looks at its files every 10 s)",
        ["rotation", "requests", "failed", "agent on the new files after s",
         "new pod served afterwards"],
    )  # fmt: skip
    failed_total = 0
    for what, during, moved, new_ok in rows:
        failed = sum(pod_load.failed(during).values())
        failed_total += failed
        table.add(what, sum(during.values()), failed, round(moved, 2),
                  "yes" if new_ok else "no")  # fmt: skip
    section.check("certificate rotation: failed requests", "0", str(failed_total),
                  failed_total == 0)  # fmt: skip
    section.check(
        "certificate rotation: a new pod served over the new material",
        "yes, each time",
        ", ".join("yes" if row[3] else "no" for row in rows),
        all(row[3] for row in rows),
    )
    section.data["rotation"] = [
        {"rotation": what, "statuses": during, "moved": moved, "new_pod_served": new_ok}
        for what, during, moved, new_ok in rows
    ]  # fmt: skip
