"""Builds the server from its configuration, runs it, and shuts it down gracefully.

Start-up order matters: everything that can be wrong with the configuration (certificates,
kubeconfig, base ARN) is checked before anything listens, and gRPC is served only once both
watches have synced, so that no agent is ever told "unknown pod" by a server still listing.
"""

from __future__ import annotations

import asyncio
import logging

import boto3
import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import start_http_server

from certs.tls import TlsConfigError, TlsFiles, server_credentials
from runtime.gc_pauses import GC_PAUSES
from runtime.process import StartupError
from server import heap, metrics
from server.arn import ArnError, RoleResolver, detect_base_arn
from server.audit import AuditTrail
from server.config import ServerConfig
from server.credentials import DEFAULT_REFRESH_JITTER, CredentialCache
from server.credentials_proto import CredentialMessages
from server.events import EventRecorder
from server.fanout import NodeFanout
from server.first_credentials import FirstCredentialsTimer
from server.kubeconfig import KubeConfigError, check_api_reachable, load_api_client
from server.pods import UNFINISHED_PODS
from server.reflector import Reflector
from server.registry import Registry
from server.service import SERVICE_NAME, KiamService, add_to_server
from server.sessions import SessionNameFrom, session_namer, session_tagger
from server.startup_taint import StartupTaintRemover
from server.sts import StsGateway
from server.sts_budget import StsBudget
from server.token_credentials import TokenPods
from server.token_review import TokenReviewer
from server.webhook import InjectSettings, ReloadingContext, webhook_app

log = logging.getLogger(__name__)

# gRPC's core keeps the calls that have arrived but that grpc.aio has not yet taken (it takes
# them one at a time, on the event loop that also builds every node stream's snapshot) in a
# queue, and by default refuses calls at random once 1,000 wait and all of them at 3,000: a
# fleet of agents reconnecting at once (a server restart, a replica replacement) saw thousands
# of WatchNode calls end CANCELLED before their snapshot, each agent getting in only on a
# later retry. A queue as deep as the largest cluster has nodes (twice over: a stream and a
# unary call each) paces them instead: each waits its turn for the loop, and gets in. Calls
# still waiting after UNREQUESTED_SECONDS are refused as before.
MAX_PENDING_CALLS = 16_384
UNREQUESTED_SECONDS = 120
CONNECT_STORM_OPTIONS = (
    ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
    ("grpc.server.max_pending_requests_hard_limit", 2 * MAX_PENDING_CALLS),
    ("grpc.server_max_unrequested_time_in_server", UNREQUESTED_SECONDS),
)

# Every agent holds its own connection to the server, so what a connection costs is paid once
# per node (5,000 at the largest). gRPC's TLS frame protector keeps, for as long as the
# connection lives, a buffer as large as the biggest TLS record the server writes (16 KB by
# default); records of at most 4 KB took 19 KB off each node stream's ~110 KB (bench, server
# scale, 500 streams: 109 → 90 KB). A unary answer (about 1.5 KB) still goes out in one
# record; a snapshot goes out in more, smaller ones. Measured and left at their defaults, as
# they changed nothing measurable: HTTP/2 BDP probing (grpc.http2.bdp_probe), the TCP read
# chunk size and the HPACK table sizes.
MEMORY_PER_CONNECTION_OPTIONS = (("grpc.tsi.max_frame_size", 4096),)


class PodiamServer:
    def __init__(self, config: ServerConfig, *, boto_session: boto3.Session | None = None) -> None:
        self.config = config
        self._boto_session = boto_session
        self.port: int | None = None
        self._tasks: list[asyncio.Task] = []
        self._grpc: grpc.aio.Server | None = None
        self._closers: list = []
        self.webhook_port: int | None = None
        self._webhook: web.AppRunner | None = None
        self.metrics_port: int | None = None

    async def start(self) -> None:
        config = self.config
        tls = TlsFiles(cert=config.cert, key=config.key, ca=config.ca)
        try:
            # Reloaded when the files change, so certificate rotation needs no restart.
            credentials = server_credentials(tls, reload=True)
        except TlsConfigError as error:
            raise StartupError(str(error)) from error
        metrics.CERTIFICATE_EXPIRY.watch("server", tls)
        resolver = RoleResolver(await self._base_arn())
        try:
            api = await load_api_client(config.kubeconfig)
            self._closers.append(api.close)
            await check_api_reachable(api)
        except KubeConfigError as error:
            raise StartupError(str(error)) from error

        first_credentials = FirstCredentialsTimer()  # told of the fan-out below
        try:
            audit = AuditTrail(config.audit_log, on_first_served=first_credentials.served)
        except OSError as error:
            raise StartupError(f"--audit-log {config.audit_log}: {error}") from error
        self._closers.append(_as_async(audit.close))
        self.audit = audit
        gateway = StsGateway(
            audit=audit,
            transitive_tags=config.transitive_session_tags,
            region=config.region,
            endpoint_url=config.sts_endpoint,
            assume_role_arn=config.assume_role_arn,
            session_duration=config.session_duration,
            boto_session=self._boto_session,
        )
        self._closers.append(_as_async(gateway.close))
        recorder = EventRecorder(api)
        recorder.start()
        self._closers.append(recorder.close)
        self.recorder = recorder

        # The credentials cache announces each identity's credentials (or none) to the node
        # fan-out, which keeps them as wire messages for the node streams and the unary RPC;
        # the registry tells the fan-out which IPs changed on which nodes.
        messages = CredentialMessages()
        self._closers.append(_as_async(messages.clear))  # closers run last first: after the cache
        fanout = NodeFanout(messages)
        first_credentials.streams = fanout.streams
        budget = StsBudget(qps=config.sts_qps, burst=config.sts_burst)
        cache = CredentialCache(
            gateway,
            refresh_before=config.session_refresh,
            on_update=fanout.credentials_changed,
            budget=budget,
            refresh_jitter=DEFAULT_REFRESH_JITTER,
        )
        self._closers.append(budget.close)  # closers run last first: after the cache
        self._closers.append(cache.close)

        registry = Registry(
            resolver=resolver,
            session_name=session_namer(config.session_name_from, config.session_name),
            session_tags=session_tagger(
                per_pod=config.session_name_from is SessionNameFrom.POD,
                cluster_name=config.cluster_name,
            )
            if config.session_tags
            else None,
            credentials=cache,
            changes=fanout,
            denials=recorder,
            allowed_accounts=config.allowed_accounts,
            on_pod_active=first_credentials.active,
            on_pod_gone=_both(audit.pod_gone, first_credentials.gone),
        )
        self.registry = registry
        self.cache = cache
        self.messages = messages
        self.fanout = fanout
        self.startup_taint: StartupTaintRemover | None = None
        if config.startup_taint is not None:
            self.startup_taint = StartupTaintRemover(
                api, key=config.startup_taint, on_removed=recorder.node_event
            )
            self._closers.append(self.startup_taint.close)
            log.info(
                "removing the %s taint from nodes whose agents report ready", config.startup_taint
            )
        self.token_pods: TokenPods | None = None
        if config.token_credentials:
            reviewer = TokenReviewer(api, audience=config.token_audience)
            self.token_pods = TokenPods(reviewer, registry, api)
        # Before the first list, so that a server stuck listing shows (podiam_server_synced 0).
        GC_PAUSES.install()  # the sync's collections too
        self._serve_metrics()
        await self._sync(api, registry)
        metrics.SYNCED.set(1)
        first_credentials.arm()
        await self._serve(registry, cache, messages, fanout, recorder, credentials)
        if config.webhook_bind is not None:
            await self._serve_webhook()

    async def _base_arn(self) -> str:
        if self.config.role_base_arn:
            return self.config.role_base_arn
        try:
            base = await detect_base_arn(self.config.metadata_endpoint)
        except ArnError as error:
            raise StartupError(f"--role-base-arn-autodetect: {error}") from error
        log.info("role base ARN detected from the instance profile: %s", base)
        return base

    async def _sync(self, api, registry: Registry) -> None:
        reflectors = [
            Reflector(api, resource="namespaces", sink=registry.namespace_sink),
            Reflector(api, resource="pods", sink=registry.pod_sink, field_selector=UNFINISHED_PODS),
        ]
        for reflector in reflectors:
            name = f"watch-{reflector.resource}"
            self._tasks.append(asyncio.create_task(reflector.run(), name=name))
        log.info("listing namespaces and pods")
        # Reflectors retry forever (logging why), so a server that cannot list stays unready.
        await asyncio.gather(*(reflector.synced.wait() for reflector in reflectors))
        log.info("synced %d pods in %d namespaces", len(registry.pods), len(registry.namespaces))
        heap.settle()  # the index is now most of the heap: out of the collector's way
        self._closers.append(_as_async(heap.unsettle))

    async def _serve(self, registry, cache, messages, fanout, recorder, credentials) -> None:
        config = self.config
        age_ms = int(config.max_connection_age.total_seconds() * 1000)
        grace_ms = int(config.max_connection_age_grace.total_seconds() * 1000)
        server = grpc.aio.server(
            options=[
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
                # The least time between an agent's keepalive pings that this server takes
                # (a quicker one is a strike; two and the connection is closed). Agents ping
                # every 5 s, so that a partition is noticed within seconds (agent/client.py).
                ("grpc.http2.min_ping_interval_without_data_ms", 4_000),
                ("grpc.http2.max_pings_without_data", 0),
                ("grpc.max_connection_age_ms", age_ms),
                ("grpc.max_connection_age_grace_ms", grace_ms),
                *CONNECT_STORM_OPTIONS,
                *MEMORY_PER_CONNECTION_OPTIONS,
            ]
        )
        service = KiamService(
            registry=registry,
            credentials=cache,
            messages=messages,
            fanout=fanout,
            node_binding=config.node_binding,
            node_stream_linger=config.node_stream_linger.total_seconds(),
            denials=recorder,
            startup_taint=self.startup_taint,
            audit=self.audit,
            token_pods=self.token_pods,
            allowed_accounts=config.allowed_accounts,
        )
        add_to_server(service, server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        host, port = config.bind
        try:
            self.port = server.add_secure_port(f"{_bracket(host)}:{port}", credentials)
        except RuntimeError as error:
            raise StartupError(f"cannot listen on {host}:{port}: {error}") from error
        await server.start()
        self._grpc = server
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving gRPC on %s:%d", host, self.port)

    async def _serve_webhook(self) -> None:
        config = self.config
        assert config.webhook_bind is not None
        files = TlsFiles(
            cert=config.webhook_cert or config.cert, key=config.webhook_key or config.key,
            ca=config.ca,
        )  # fmt: skip
        try:
            tls = ReloadingContext(files)
        except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
            raise StartupError(f"webhook certificate: {error}") from error
        self._tasks.append(asyncio.create_task(tls.watch(), name="webhook-tls"))
        settings = InjectSettings(
            endpoint=config.webhook_endpoint,
            audience=config.token_audience,
            expiration_seconds=int(config.webhook_token_expiration.total_seconds()),
        )
        runner = web.AppRunner(webhook_app(settings), access_log=None, handle_signals=False)
        await runner.setup()
        host, port = config.webhook_bind
        site = web.TCPSite(runner, host, port, ssl_context=tls.context)
        try:
            await site.start()
        except OSError as error:
            await runner.cleanup()
            raise StartupError(f"cannot serve the webhook on {host}:{port}: {error}") from error
        self._webhook = runner
        self.webhook_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("serving the admission webhook on %s:%d", host, self.webhook_port)

    def _serve_metrics(self) -> None:
        if self.config.prometheus_listen_addr is None:
            return
        host, port = self.config.prometheus_listen_addr
        try:
            httpd, _thread = start_http_server(port, addr=host)
        except OSError as error:
            raise StartupError(f"cannot serve metrics on {host}:{port}: {error}") from error
        self.metrics_port = httpd.server_port

        async def close() -> None:
            await asyncio.to_thread(httpd.shutdown)
            httpd.server_close()

        self._closers.append(close)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop taking new RPCs, let in-flight ones finish within ``grace``, then tear down."""
        if self._webhook is not None:
            await self._webhook.cleanup()
        if self._grpc is not None:
            for name in ("", SERVICE_NAME):
                await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            self.fanout.close()
            await self._grpc.stop(grace)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for close in reversed(self._closers):
            await close()


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _both(first, second):
    def call(*args) -> None:
        first(*args)
        second(*args)

    return call


def _as_async(fn):
    async def call() -> None:
        fn()

    return call
