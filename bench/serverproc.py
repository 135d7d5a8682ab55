"""podiam-server as its own process, for the sections that measure the server alone
(bench/server_scale.py against the Kubernetes API test double, bench/real_scale.py against a
real control plane): started as an operator runs it, pinned to the served core, its log lines
timestamped as they arrive, since the sync and the start-up are timed from them."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from bench import procs
from certs.tls import TlsFiles
from tests.support.moto_sts import FAKE_ACCESS_KEY_ID, FAKE_SECRET_ACCESS_KEY, MotoSts
from tests.support.scrape import unlabelled_value
from tests.support.server import BASE_ARN

_SERVING = re.compile(r"serving gRPC on [^:]+:(\d+)")


class ServerProcess:
    """podiam-server against ``kubeconfig`` and moto's STS, with ``args`` after the common
    flags; from ``cwd`` (a checkout of another revision) when given, else from this tree.

    ``marks`` holds when (``time.perf_counter``) it was spawned, began ``listing``, had
    ``synced`` and was ``serving``, and its CPU seconds at ``listing_cpu`` and ``synced_cpu``."""

    def __init__(
        self, kubeconfig: Path, sts: MotoSts, tls: Path, *, args: Sequence[str] = (),
        cwd: Path | None = None, start_timeout: float = 300.0,
    ) -> None:  # fmt: skip
        self.kubeconfig, self.sts, self.tls = kubeconfig, sts, tls
        self.args = list(args)
        self.module = "server"  # what `python -m` runs: a subclass may wrap the server
        self.env: dict[str, str] = {}  # and tell its wrapper more through the environment
        self.cwd = cwd or procs.REPO
        self.start_timeout = start_timeout
        self.process: asyncio.subprocess.Process | None = None
        self.metrics_port = procs.free_port()
        self.port = 0
        self.marks: dict[str, float] = {}
        self.log: collections.deque[str] = collections.deque(maxlen=200)
        self._reader: asyncio.Task | None = None

    async def start(self) -> None:
        await self.spawn()
        await self.serving()

    async def spawn(self) -> None:
        files = TlsFiles.server_in(self.tls)
        self.marks["spawn"] = time.perf_counter()
        self.process = await procs.spawn(
            [
                "-m", self.module, "--bind", "127.0.0.1:0",
                "--cert", str(files.cert), "--key", str(files.key), "--ca", str(files.ca),
                "--kubeconfig", str(self.kubeconfig),
                "--role-base-arn", BASE_ARN, "--region", "us-east-1",
                "--sts-endpoint", self.sts.endpoint_url,
                "--prometheus-listen-addr", f"127.0.0.1:{self.metrics_port}",
                *self.args,
            ],
            core=procs.cpu(procs.SERVED_CPU),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            extra_env={
                "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY_ID,
                "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_ACCESS_KEY,
                "AWS_EC2_METADATA_DISABLED": "true",
                **self.env,
            },
            cwd=self.cwd,
        )  # fmt: skip
        self._reader = asyncio.create_task(self._read())

    async def serving(self) -> None:
        """Until the server logs that it serves gRPC; its last log lines if it never does."""
        deadline = time.perf_counter() + self.start_timeout
        while "serving" not in self.marks:
            if self.process.returncode is not None or time.perf_counter() > deadline:
                tail = list(self.log)[-20:]
                raise RuntimeError("podiam-server did not start:\n" + "\n".join(tail))
            await asyncio.sleep(0.01)

    def synced(self) -> None:
        """Called as the server logs its initial sync done, for a subclass to act on."""

    def logged(self, text: str) -> None:
        """Called with every log line (``log`` keeps only the last ones), for a subclass."""

    async def _read(self) -> None:
        while line := await self.process.stderr.readline():
            now, text = time.perf_counter(), line.decode(errors="replace").rstrip()
            self.log.append(text)
            self.logged(text)
            if "listing namespaces and pods" in text:
                self.marks["listing"] = now
                self.marks["listing_cpu"] = procs.cpu_seconds(self.process.pid)
            elif "synced" in text and "pods" in text:
                self.marks["synced"] = now
                self.marks["synced_cpu"] = procs.cpu_seconds(self.process.pid)
                self.synced()
            elif match := _SERVING.search(text):
                self.port = int(match.group(1))
                self.marks["serving"] = now

    async def metric(self, session: aiohttp.ClientSession, name: str) -> float:
        """An unlabelled metric's value from the server's /metrics, 0 while it has none."""
        async with session.get(f"http://127.0.0.1:{self.metrics_port}/metrics") as response:
            return unlabelled_value(await response.text(), name)

    async def stop(self) -> None:
        await procs.stop(self.process)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
