"""Builds the agent from its configuration, runs it, and shuts it down gracefully.

Order matters. Start-up checks what can be wrong (certificates, NET_ADMIN) before anything
else, installs the DNAT rule before serving (a pod must never fall through to the node's own
metadata service), serves at once (so /ping answers) but hands out credentials only once
connected to a server. Shutdown drains the HTTP server first and removes the rule last.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.client import ServerClient, ServerConnection, StreamFollower
from agent.config import AgentConfig
from agent.handlers.credentials import CredentialsHandler
from agent.handlers.health import HealthHandler
from agent.handlers.info import InfoHandler
from agent.handlers.proxy import ProxyHandler
from agent.handlers.role import RoleHandler
from agent.handlers.token import TokenHandler
from agent.iptables import IptablesError, MetadataRedirect, check_can_manage
from agent.lookup import PodLookup
from agent.proxy import MetadataProxy
from agent.readiness import ReadinessReporter
from agent.routes import MetadataRoutes
from agent.state import NodeState
from agent.tokens import TokenAuthority, key_for_node
from certs.tls import TlsConfigError, TlsFiles
from runtime.process import StartupError

log = logging.getLogger(__name__)

# How long in-flight requests may take to finish at shutdown.
DRAIN_SECONDS = 5.0


class PodiamAgent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.state = NodeState()
        self._runners: list[web.AppRunner] = []
        self._tasks: list[asyncio.Task] = []
        self._closers: list = []
        self._redirect: MetadataRedirect | None = None

    async def start(self) -> None:
        config = self.config
        try:
            connection = ServerConnection(
                config.server_address, TlsFiles(cert=config.cert, key=config.key, ca=config.ca)
            )
        except TlsConfigError as error:
            raise StartupError(str(error)) from error
        self._closers.append(connection.close)
        if config.iptables:
            await self._install_redirect()

        client = ServerClient(connection)
        reporter = ReadinessReporter(
            lambda: connection.stub,
            node_name=config.node_name,
            host_ip=config.host,
            redirect=self._redirect,
        )
        self.reporter = reporter
        self._closers.append(reporter.close)
        follower = StreamFollower(
            client,
            self.state,
            host_ip=config.host,
            server=config.server_address,
            rotated=connection.rotated,
            on_synced=reporter.synced,
        )
        self.follower = follower
        self.connection = connection
        self._tasks.append(asyncio.create_task(follower.run(), name="node-stream"))
        self._tasks.append(asyncio.create_task(connection.watch_files(), name="tls-files"))
        proxy = MetadataProxy(config.metadata_endpoint, allow=config.allow_route_regexp)
        self._closers.append(proxy.close)

        lookup = PodLookup(
            self.state,
            client,
            pod_wait=config.pod_wait.total_seconds(),
            connected=follower.connected,
        )
        # Tokens survive restarts: SDKs hold them for hours (see agent/tokens.py).
        tokens = TokenAuthority(key=key_for_node(config.key, f"{config.node_name}|{config.host}"))
        routes = MetadataRoutes(
            role=RoleHandler(lookup),
            credentials=CredentialsHandler(lookup),
            info=InfoHandler(lookup, self.state),
            token=TokenHandler(tokens),
            health=HealthHandler(follower.connected, self.state),
            proxy=ProxyHandler(proxy, allow_pattern=config.allow_route_regexp.pattern),
            tokens=tokens,
            require_imdsv2=config.require_imdsv2,
        )
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", routes.handle)
        self.port = await self._serve(app, config.host, config.port, "metadata API")
        if config.prometheus_listen_addr is not None:
            host, port = config.prometheus_listen_addr
            self.metrics_port = await self._serve(_metrics_app(), host, port, "metrics")
        log.info(
            "serving the metadata API on %s:%d; waiting for podiam server %s",
            config.host,
            self.port,
            config.server_address,
        )

    async def _install_redirect(self) -> None:
        config = self.config
        try:
            await check_can_manage()
            self._redirect = MetadataRedirect(
                host=config.host, port=config.port, interface=config.host_interface
            )
            await self._redirect.install()
        except IptablesError as error:
            raise StartupError(str(error)) from error

    async def _serve(self, app: web.Application, host: str, port: int, what: str) -> int:
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=DRAIN_SECONDS
        )
        await runner.setup()
        self._runners.append(runner)
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except OSError as error:
            message = f"cannot serve the {what} on {host}:{port}: {error.strerror or error}"
            raise StartupError(message) from error
        return runner.addresses[0][1]

    async def stop(self) -> None:
        """Drain in-flight requests, then remove the DNAT rule, then disconnect."""
        for runner in self._runners:
            await runner.cleanup()
        if self._redirect is not None and self.config.iptables_remove:
            try:
                await self._redirect.remove()
            except IptablesError as error:
                log.error("could not remove the DNAT rule: %s", error)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for close in reversed(self._closers):
            await close()


def _metrics_app() -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app
