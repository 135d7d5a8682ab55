"""Builds the agent from its configuration, runs it, and shuts it down gracefully.

Order matters. Start-up checks what can be wrong (certificates, NET_ADMIN) before anything
else, installs the DNAT rule before serving (a pod must never fall through to the node's own
metadata service) and cuts connections opened to the metadata address before it, binds the
port, and serves at once (so /ping answers) but hands out credentials only once connected to a
server — unless another agent already serves the port (an upgrade: see agent/listener.py), in
which case it starts listening only once its node stream has delivered a snapshot. Pods are
served by the agent's own listener (agent/httpserver.py, with the route table agent/routes.py),
and token-bound credentials, when enabled, by a second one on their own port (the route table
agent/container_credentials.py); the metrics endpoint, which only Prometheus reads, stays on
aiohttp.

Shutdown stops listening first (the other agent on the port, if any, takes the new
connections), tells clients on keep-alive connections to close for a moment, then drains what
is in flight. It never removes the DNAT rule: while no agent listens, pods get "connection
refused", never the node's role. ``podiam-agent cleanup`` removes it (agent/cleanup.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent import listener, metrics
from agent.client import ServerConnection
from agent.config import AgentConfig
from agent.conntrack import ConntrackError, check_available, cut_metadata_connections
from agent.container_credentials import ContainerCredentials, token_limits
from agent.handlers.credentials import CredentialsHandler
from agent.handlers.health import HealthHandler
from agent.handlers.info import InfoHandler
from agent.handlers.proxy import ProxyHandler
from agent.handlers.role import RoleHandler
from agent.handlers.token import TokenHandler
from agent.hostroutes import HostRoutes
from agent.httpserver import HttpListener
from agent.iptables import IptablesError, MetadataRedirect, check_can_manage
from agent.limits import PodBuckets, raise_open_files_limit
from agent.lookup import PodLookup
from agent.proxy import MetadataProxy
from agent.readiness import ReadinessReporter
from agent.routes import MetadataRoutes
from agent.state import NodeState
from agent.streams import NodeStreams
from agent.tokens import TokenAuthority, key_for_node
from certs.tls import TlsConfigError, TlsFiles
from runtime.gc_pauses import GC_PAUSES
from runtime.process import StartupError

log = logging.getLogger(__name__)

# How long in-flight requests may take to finish at shutdown.
DRAIN_SECONDS = 5.0
# After it stops listening, how long the agent keeps answering on open keep-alive connections,
# each answer with "Connection: close", before closing the idle ones: clients busy on a
# connection leave it cleanly instead of racing the close with their next request.
CLOSE_NOTICE_SECONDS = 1.0
# How often the readiness file is brought up to date.
READY_CHECK_SECONDS = 0.5
# Connections the kernel queues before the agent accepts them (capped by net.core.somaxconn).
# aiohttp's default of 128 overflowed in a burst of a Deployment's pods all asking at once: a
# connection dropped from a full queue is retried by the pod's kernel only after its 1 s SYN
# timeout, which is all of the SDK's budget.
LISTEN_BACKLOG = 4096


class PodiamAgent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.port: int | None = None
        self.metrics_port: int | None = None
        # Route evidence (agent/hostroutes.py) vouches for pod IPs while no server answers.
        self.routes = HostRoutes(config.host_interface, on_change=self._route_changed)
        self.state = NodeState(routes=self.routes, stale_grace=config.stale_grace.total_seconds())
        self._runners: list[web.AppRunner] = []
        self._tasks: list[asyncio.Task] = []
        self._closers: list = []
        self._redirect: MetadataRedirect | None = None
        self.http: HttpListener | None = None
        self.token_port: int | None = None
        self.token_endpoint: ContainerCredentials | None = None
        self.token_http: HttpListener | None = None
        self._listening = asyncio.Event()

    async def start(self) -> None:
        GC_PAUSES.install()
        config = self.config
        ready_file = config.ready_file
        if ready_file is not None:
            # A file left by a killed predecessor in the same pod must not claim readiness.
            _remove(ready_file)
        tls = TlsFiles(cert=config.cert, key=config.key, ca=config.ca)
        try:
            connection = ServerConnection(config.server_address, tls)
        except TlsConfigError as error:
            raise StartupError(str(error)) from error
        self._closers.append(connection.close)
        metrics.HELD.watch(self.state, tls)
        if config.iptables:
            await self._install_redirect()

        reporter = ReadinessReporter(
            lambda: connection.stub,
            node_name=config.node_name,
            host_ip=config.host,
            redirect=self._redirect,
        )
        self.reporter = reporter
        self._closers.append(reporter.close)
        streams = NodeStreams(
            connection,
            self.state,
            host_ip=config.host,
            server=config.server_address,
            on_synced=reporter.synced,
        )
        self.follower = self.streams = streams
        client = streams.client
        self.connection = connection
        self._tasks.append(asyncio.create_task(self.routes.run(), name="host-routes"))
        self._tasks.append(asyncio.create_task(streams.run(), name="node-streams"))
        self._tasks.append(asyncio.create_task(connection.watch_files(), name="tls-files"))
        self._tasks.append(asyncio.create_task(connection.watch_state(), name="channel-state"))
        proxy = MetadataProxy(config.metadata_endpoint, allow=config.allow_route_regexp)
        self._closers.append(proxy.close)

        lookup = PodLookup(
            self.state,
            client,
            pod_wait=config.pod_wait.total_seconds(),
            synced_once=streams.synced_once,
        )
        # Tokens survive restarts: SDKs hold them for hours (see agent/tokens.py).
        tokens = TokenAuthority(key=key_for_node(config.key, f"{config.node_name}|{config.host}"))
        limits = config.limits
        routes = MetadataRoutes(
            role=RoleHandler(lookup),
            credentials=CredentialsHandler(lookup),
            info=InfoHandler(lookup, self.state),
            token=TokenHandler(tokens),
            health=HealthHandler(streams.synced_once, self.state),
            proxy=ProxyHandler(proxy, allow_pattern=config.allow_route_regexp.pattern),
            tokens=tokens,
            lookup=lookup,
            buckets=PodBuckets(rate=limits.pod_rate, burst=limits.pod_burst),
            require_imdsv2=config.require_imdsv2,
        )
        # A connection flood must meet the listener's own limits, not the default 1,024 files.
        raise_open_files_limit()
        http = self.http = HttpListener(routes, limits, on_accepted=self.routes.settle)
        sock = self._bind(config.host, config.port, "metadata API")
        self.port = sock.getsockname()[1]
        if config.prometheus_listen_addr is not None:
            host, port = config.prometheus_listen_addr
            metrics_sock = self._bind(host, port, "metrics")
            self.metrics_port = await self._serve(_metrics_app(), metrics_sock)
        if await listener.someone_listens(config.host, self.port):
            log.info(
                "another agent serves %s:%d; listening beside it once the node stream has "
                "delivered a snapshot from podiam server %s",
                config.host,
                self.port,
                config.server_address,
            )
            self._tasks.append(
                asyncio.create_task(self._listen_when_ready(http, sock), name="listen-when-ready")
            )
        else:
            http.serve(sock, backlog=LISTEN_BACKLOG)
            self._listening.set()
            log.info(
                "serving the metadata API on %s:%d; waiting for podiam server %s",
                config.host,
                self.port,
                config.server_address,
            )
        if config.token_endpoint:
            await self._serve_token_endpoint(client, streams.synced_once)
        if ready_file is not None:
            self._tasks.append(
                asyncio.create_task(self._keep_ready_file(ready_file), name="ready-file")
            )

    async def _serve_token_endpoint(self, client, synced_once: asyncio.Event) -> None:
        """GET /v1/credentials on a second listener of its own (agent/container_credentials.py
        is its route table), reached by its own DNAT rule."""
        config = self.config
        if config.iptables:
            address, address_port = config.token_address
            try:
                await MetadataRedirect(
                    host=config.host, port=config.token_port, interface=config.host_interface,
                    metadata_ip=address, metadata_port=address_port,
                ).install()  # fmt: skip
            except (IptablesError, ValueError) as error:
                raise StartupError(f"--token-endpoint: {error}") from error
        limits = config.limits
        endpoint = ContainerCredentials(
            self.state,
            client,
            synced_once=synced_once,
            buckets=PodBuckets(rate=limits.pod_rate, burst=limits.pod_burst),
        )
        self.token_endpoint = endpoint
        http = self.token_http = HttpListener(
            endpoint, token_limits(limits), name="token-bound credentials"
        )
        sock = self._bind(config.host, config.token_port, "token-bound credentials")
        self.token_port = sock.getsockname()[1]
        if await listener.someone_listens(config.host, self.token_port):
            # An upgrade, as for the metadata port: listen beside the old agent only once this
            # one can answer, then take the new connections.
            self._tasks.append(
                asyncio.create_task(self._serve_tokens_when_ready(http, sock), name="tokens")
            )
            return
        http.serve(sock, backlog=LISTEN_BACKLOG)
        log.info("serving token-bound credentials on %s:%d", config.host, self.token_port)

    async def _serve_tokens_when_ready(self, http: HttpListener, sock: socket.socket) -> None:
        await self._listening.wait()  # the metadata port's own wait for a live snapshot
        steered = _serve_beside(http, sock)
        log.info(
            "serving token-bound credentials on %s:%d%s",
            self.config.host,
            self.token_port,
            steered,
        )

    def ready(self) -> bool:
        """Listening, and the node stream is live with its snapshot applied: what the readiness
        probe asks of this very process (the port may be answered by another agent)."""
        return self._listening.is_set() and self.streams.synced_once.is_set() and self.state.live

    async def _listen_when_ready(self, http: HttpListener, sock: socket.socket) -> None:
        await self.streams.synced_once.wait()
        while not self.state.live:  # noqa: ASYNC110 - NodeState.live has no event of its own
            await asyncio.sleep(0.05)
        steered = _serve_beside(http, sock)
        self._listening.set()
        log.info(
            "snapshot applied; serving the metadata API on %s:%d%s",
            self.config.host,
            self.port,
            steered,
        )

    def _route_changed(self, ip: str) -> None:
        self.state.route_changed(ip)

    async def _keep_ready_file(self, path: Path) -> None:
        was_ready = False
        while True:
            ready = self.ready()
            if ready != was_ready:
                if ready:
                    path.write_text("ready\n")  # noqa: ASYNC240 - a few bytes, in tmpfs
                else:
                    _remove(path)
                was_ready = ready
            await asyncio.sleep(READY_CHECK_SECONDS)

    async def _install_redirect(self) -> None:
        config = self.config
        try:
            await check_can_manage()
            check_available(config.conntrack)
            self._redirect = MetadataRedirect(
                host=config.host, port=config.port, interface=config.host_interface
            )
            await self._redirect.install()
            # Found or added, the rule holds only for new connections: cut the older ones.
            await cut_metadata_connections(conntrack=config.conntrack)
        except (IptablesError, ConntrackError) as error:
            raise StartupError(str(error)) from error
        except ValueError as error:  # a rule iptables could not express (port 0, say)
            raise StartupError(f"--iptables: {error}") from error

    def _bind(self, host: str, port: int, what: str) -> socket.socket:
        try:
            sock = listener.bind(host, port)
        except OSError as error:
            message = f"cannot serve the {what} on {host}:{port}: {error.strerror or error}"
            raise StartupError(message) from error
        self._closers.append(_closer(sock))
        return sock

    async def _serve(self, app: web.Application, sock: socket.socket) -> int:
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=DRAIN_SECONDS
        )
        await runner.setup()
        self._runners.append(runner)
        await web.SockSite(runner, sock, backlog=LISTEN_BACKLOG).start()
        return sock.getsockname()[1]

    async def stop(self) -> None:
        """Stop listening, give keep-alive clients notice, drain, disconnect; the rule stays."""
        was_listening = self._listening.is_set()
        self._listening.clear()  # not ready from now on, whatever the ready-file task sees
        if self.config.ready_file is not None:
            _remove(self.config.ready_file)
        pod_facing = [http for http in (self.http, self.token_http) if http is not None]
        for http in pod_facing:
            http.stop_accepting()
        for runner in self._runners:
            for site in list(runner.sites):
                await site.stop()
        if pod_facing:
            if was_listening:
                for http in pod_facing:
                    http.draining = True
                await asyncio.sleep(CLOSE_NOTICE_SECONDS)
            await asyncio.gather(*(http.close(drain_seconds=DRAIN_SECONDS) for http in pod_facing))
        for runner in self._runners:
            await runner.cleanup()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for close in reversed(self._closers):
            await close()


def _serve_beside(http: HttpListener, sock: socket.socket) -> str:
    """Serve on ``sock`` beside the agent already listening on its port (an upgrade) and take
    every new connection from it; the end of the log line saying whether that worked."""
    http.serve(sock, backlog=LISTEN_BACKLOG)
    try:
        listener.steer_new_connections_here(sock)
    except OSError as error:
        return f"; new connections are shared with it ({error.strerror or error})"
    return "; new connections come here only"


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _closer(sock: socket.socket):
    async def close() -> None:
        sock.close()

    return close


def _metrics_app() -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app
