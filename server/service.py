"""kiam.KiamService as podiam serves it: kiam's three unary RPCs, answered from the registry and
the credentials cache, and the node stream. Each RPC body says what to answer or raises a
``Refusal``; ``_answering`` turns either into the response, the metrics and the log line, so all
RPCs count and log alike.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import time
from typing import Protocol
from urllib.parse import unquote

import grpc

from protos import REASON_METADATA, kiam_pb2, kiam_pb2_grpc
from server import metrics
from server.audit import AuditTrail
from server.credentials import CredentialCache, CredentialsUnavailable
from server.credentials_proto import CredentialMessages
from server.explain import ServerView, explain_pod
from server.fanout import NodeFanout
from server.node_stream import NodeStream
from server.pods import PodRecord
from server.policy import Denial, Reason, check_request
from server.registry import Registry
from server.startup_taint import NodeReportError, Outcome, StartupTaintRemover
from server.token_credentials import TokenDenied, TokenPods

log = logging.getLogger(__name__)


class RequestDenials(Protocol):
    """Where denials that depend on the request are reported (Kubernetes Events)."""

    def record(self, pod: PodRecord, denial: Denial) -> None: ...


class Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, reason: Reason | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason


@functools.lru_cache(maxsize=1024)  # one peer string per agent connection, asked every call
def peer_ip(peer: str) -> str | None:
    """The IP of a gRPC peer string such as ``ipv4:10.0.0.1:5050`` or ``ipv6:[::1]:5050``;
    IPv4-mapped IPv6 addresses are given as IPv4 (a dual-stack listener reports them so)."""
    kind, _, rest = unquote(peer).partition(":")
    if kind == "ipv4":
        host = rest.rpartition(":")[0]
    elif kind == "ipv6":
        host = rest.rpartition(":")[0].strip("[]")
    else:
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


class KiamService(kiam_pb2_grpc.KiamServiceServicer):
    def __init__(
        self,
        *,
        registry: Registry,
        credentials: CredentialCache,
        messages: CredentialMessages,
        fanout: NodeFanout,
        node_binding: bool = True,
        denials: RequestDenials | None = None,
        startup_taint: StartupTaintRemover | None = None,
        audit: AuditTrail | None = None,
        token_pods: TokenPods | None = None,
        allowed_accounts: frozenset[str] = frozenset(),
        node_stream_linger: float = 0.0,
    ) -> None:
        self._token_pods = token_pods
        self._node_stream_linger = node_stream_linger
        self._audit = audit
        self._allowed_accounts = allowed_accounts
        self._registry = registry
        self._credentials = credentials
        self._messages = messages
        self._fanout = fanout
        self._node_binding = node_binding
        self._denials = denials
        self._startup_taint = startup_taint

    # ---- kiam's RPCs ------------------------------------------------------------------------

    async def GetPodCredentials(self, request, context) -> kiam_pb2.Credentials:
        """The servicer interface's GetPodCredentials; the server serves ``pod_credentials``
        instead (``add_to_server``), which answers with the same message, serialized."""
        return kiam_pb2.Credentials.FromString(await self.pod_credentials(request, context))

    async def pod_credentials(self, request, context) -> bytes:
        """GetPodCredentials, answered with the serialized message: each identity's current
        credentials are serialized once (server/credentials_proto.py) and the bytes handed to
        gRPC as they are. Every call still looks the pod up and runs every check (the grant
        as the registry holds it now, the caller's node, the requested role) and takes the
        credentials from the cache as it holds them now: only the bytes of a set of
        credentials are kept, never an answer for a pod."""
        async with _answering("GetPodCredentials", context, request.ip):
            pod, grant = self._permitted(request.ip, context, requested_role=request.role)
            identity = grant.identity
            creds = self._credentials.fresh(identity)
            if creds is None:  # fetching, or deciding what to serve while STS fails
                try:
                    creds = await self._credentials.get(identity)
                except CredentialsUnavailable as error:
                    raise Refusal(grpc.StatusCode.UNAVAILABLE, str(error)) from error
            if self._audit is not None:
                self._audit.pod_served(pod, identity, creds.access_key_id)
            return self._messages.serialized(identity, creds)

    async def GetPodRole(self, request, context) -> kiam_pb2.Role:
        async with _answering("GetPodRole", context, request.ip):
            pod, _grant = self._permitted(request.ip, context, requested_role=None)
            return kiam_pb2.Role(name=pod.role)

    async def GetHealth(self, request, context) -> kiam_pb2.HealthStatus:
        async with _answering("GetHealth", context, ""):
            return kiam_pb2.HealthStatus(message="ok")

    # ---- podiam's node stream ---------------------------------------------------------------

    async def WatchNode(self, request, context) -> None:
        """Written with ``context.write`` rather than yielded: a handler that yields each update
        leaves the last one bound (here and in grpc.aio's loop over the generator) while the
        stream waits for the next change — the node's whole snapshot, for most streams most of
        the time, about a quarter of what a stream cost the server (bench, server scale)."""
        caller = peer_ip(context.peer())
        host_ip = request.host_ip or caller or ""
        if self._node_binding and host_ip != caller:
            metrics.REQUESTS.tally("WatchNode", "PERMISSION_DENIED")
            log.warning("node stream refused: caller %s asked for node %s", caller, host_ip)
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"caller {caller} may only watch its own node, not {host_ip}",
            )
        log.info("node stream opened for %s", host_ip)
        metrics.REQUESTS.tally("WatchNode", "OK")
        stream = NodeStream(
            pods=self._registry,
            fanout=self._fanout,
            host_ip=host_ip,
            audit=self._audit,
            linger=self._node_stream_linger,
        )
        try:
            async for update in stream.updates():
                await context.write(update)
                del update  # sent: not held while the stream waits
        finally:
            log.info("node stream closed for %s", host_ip)

    async def ReportNodeReady(self, request, context) -> kiam_pb2.NodeReadyAnswer:
        async with _answering("ReportNodeReady", context, request.host_ip):
            return await self._node_ready(request, context)

    async def _node_ready(self, request, context) -> kiam_pb2.NodeReadyAnswer:
        remover = self._startup_taint
        if remover is None:
            return kiam_pb2.NodeReadyAnswer(
                outcome="disabled", message="this server manages no startup taint"
            )
        node = request.node_name
        if not node:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "the report names no node")
        if not (request.redirect_installed and request.snapshot_applied):
            # The taint is what keeps pods off a node that cannot intercept their metadata
            # requests yet; it stays until the agent can say both.
            missing = [
                what
                for what, done in (
                    ("its DNAT rule is not installed", request.redirect_installed),
                    ("it has applied no node snapshot", request.snapshot_applied),
                )
                if not done
            ]
            metrics.STARTUP_TAINT_REMOVALS.labels(outcome="not_ready").inc()
            raise Refusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"node {node} keeps its {remover.key} taint: " + " and ".join(missing),
            )
        # With node binding the node must have the connection's address, so a certificate
        # stolen on node A cannot untaint node B. Without it (peer addresses are not node
        # addresses there) the agent's own claim is checked, which catches misconfiguration
        # but not malice, as everywhere else under --no-node-binding.
        address = peer_ip(context.peer()) if self._node_binding else request.host_ip
        try:
            outcome = await remover.node_ready(node, address=address or "")
        except NodeReportError as error:
            if error.kind != NodeReportError.UNAVAILABLE:
                metrics.STARTUP_TAINT_REMOVALS.labels(outcome="refused").inc()
            raise Refusal(_REPORT_CODES[error.kind], error.message) from error
        if outcome is Outcome.ABSENT:
            return kiam_pb2.NodeReadyAnswer(
                outcome=outcome.value, message=f"node {node} carries no {remover.key} taint"
            )
        log.info("node %s reported ready by its agent at %s", node, address)
        return kiam_pb2.NodeReadyAnswer(
            outcome=outcome.value, message=f"removing the {remover.key} taint from node {node}"
        )

    # ---- podiam's token-bound credentials ----------------------------------------------------

    async def GetTokenCredentials(self, request, context) -> kiam_pb2.TokenCredentials:
        async with _answering("GetTokenCredentials", context, "token"):
            return await self._token_credentials(request, context)

    async def _token_credentials(self, request, context) -> kiam_pb2.TokenCredentials:
        if self._token_pods is None:
            raise Refusal(
                grpc.StatusCode.UNIMPLEMENTED,
                "this server serves no token-bound credentials (see --token-credentials)",
            )
        caller = peer_ip(context.peer()) if self._node_binding else None
        try:
            found = await self._token_pods.grant(request.token, caller_ip=caller)
        except TokenDenied as denied:
            reason = denied.denial.reason
            if denied.pod is not None and not denied.unavailable and self._denials is not None:
                self._denials.record(denied.pod, denied.denial)
            if denied.unavailable:
                code = grpc.StatusCode.UNAVAILABLE
            elif reason in (Reason.INVALID_TOKEN, Reason.TOKEN_NOT_BOUND):
                code = grpc.StatusCode.UNAUTHENTICATED
            elif reason is Reason.NO_ROLE:
                code = grpc.StatusCode.NOT_FOUND
            else:
                code = grpc.StatusCode.PERMISSION_DENIED
            # "Cannot tell now" is no policy decision: no reason, no denial counted.
            raise Refusal(
                code, denied.denial.message, None if denied.unavailable else reason
            ) from denied
        pod, identity = found.pod, found.grant.identity
        assert identity is not None
        try:
            creds = await self._credentials.get(identity)
        except CredentialsUnavailable as error:
            raise Refusal(grpc.StatusCode.UNAVAILABLE, str(error)) from error
        if self._audit is not None:
            self._audit.pod_served(pod, identity, creds.access_key_id)
        return kiam_pb2.TokenCredentials(
            credentials=self._messages.message(identity, creds),
            namespace=pod.namespace,
            name=pod.name,
            uid=pod.uid,
            ip=pod.ip if pod.active else "",
            identity=identity.key,
            token_expires=int(found.token.expires),
        )

    # ---- podiam-server explain ----------------------------------------------------------------

    async def ExplainPod(self, request, context) -> kiam_pb2.PodExplanation:
        async with _answering("ExplainPod", context, ""):
            if not is_local(peer_ip(context.peer())):
                # Any agent certificate could ask otherwise, and learn every namespace's roles
                # and patterns; an operator reaches the server's loopback with kubectl exec or
                # kubectl port-forward.
                raise Refusal(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "ExplainPod is answered only to callers on the server's own host (kubectl "
                    "exec or kubectl port-forward to the server pod)",
                )
            if not request.namespace or not request.name:
                raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "name a pod: namespace and name")
            registry = self._registry
            view = ServerView(
                pod=registry.pod,
                pods_with_ip=registry.pods_with_ip,
                namespace=registry.namespaces.get,
                resolver=registry.resolver,
                allowed_accounts=self._allowed_accounts,
                identity_state=self._credentials.state,
                streams=self._fanout.streams,
                node_binding=self._node_binding,
            )
            return explain_pod(request.namespace, request.name, view).message()

    # ---- policy -----------------------------------------------------------------------------

    def _permitted(self, ip: str, context, *, requested_role: str | None):
        if not ip:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "the request carries no pod IP")
        found = self._registry.lookup(ip)
        if found.pod is None:
            code = (
                grpc.StatusCode.NOT_FOUND
                if found.denial.reason is Reason.UNKNOWN_POD
                else grpc.StatusCode.PERMISSION_DENIED
            )
            raise Refusal(code, found.denial.message, found.denial.reason)
        caller = peer_ip(context.peer()) if self._node_binding else None
        denial = check_request(
            found.pod,
            found.grant,
            caller_ip=caller,
            requested_role=requested_role,
            resolver=self._registry.resolver,
        )
        if denial is not None:
            # The pod's own denial was reported by the registry when it decided the grant; only
            # what depends on this request (which node asks, which role) is reported here.
            if denial is not found.grant.denial and self._denials is not None:
                self._denials.record(found.pod, denial)
            code = (
                grpc.StatusCode.NOT_FOUND
                if denial.reason is Reason.NO_ROLE
                else grpc.StatusCode.PERMISSION_DENIED
            )
            raise Refusal(code, denial.message, denial.reason)
        return found.pod, found.grant


# As the protocol names it: what gRPC routes by, and what the health service reports on.
SERVICE_NAME = kiam_pb2.DESCRIPTOR.services_by_name["KiamService"].full_name


class _Handlers:
    """Stands in for a server to take the method handlers the generated registration builds."""

    handlers: dict[str, grpc.RpcMethodHandler]

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass  # rebuilt by add_to_server from the registered ones

    def add_registered_method_handlers(self, service: str, handlers) -> None:
        self.handlers = dict(handlers)


def add_to_server(service: KiamService, server: grpc.aio.Server) -> None:
    """Register ``service`` as the generated code does, except that GetPodCredentials is served
    by ``pod_credentials`` with no response serializer: gRPC sends the bytes it returns as they
    are (what it would otherwise get from ``SerializeToString`` on every call)."""
    taken = _Handlers()
    kiam_pb2_grpc.add_KiamServiceServicer_to_server(service, taken)
    handlers = taken.handlers
    handlers["GetPodCredentials"] = grpc.unary_unary_rpc_method_handler(
        service.pod_credentials,
        request_deserializer=kiam_pb2.GetPodCredentialsRequest.FromString,
        response_serializer=None,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def is_local(ip: str | None) -> bool:
    """Whether a peer address is this host's loopback (IPv4-mapped addresses already unwrapped
    by ``peer_ip``)."""
    try:
        return ip is not None and ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


_REPORT_CODES = {
    NodeReportError.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    NodeReportError.NOT_THIS_NODE: grpc.StatusCode.PERMISSION_DENIED,
    NodeReportError.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}


class _answering:
    """Counts, times and logs one unary RPC, and turns a Refusal into its gRPC status.

    A class rather than an ``asynccontextmanager``: every call of the unary RPCs passes through
    it, and a generator-based manager costs an async generator per call, registered with the
    event loop and forgotten again. With the lock-free request metrics, the handler of
    GetPodCredentials went from 11 to 5 µs per call (alone in a loop; README, Performance)."""

    __slots__ = ("_context", "_ip", "_rpc", "_started")

    def __init__(self, rpc: str, context, ip: str) -> None:
        self._rpc = rpc
        self._context = context
        self._ip = ip
        self._started = time.perf_counter()

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, kind, error, traceback) -> bool:
        if kind is None:
            self._count("OK")
            return False
        ip = self._ip or "-"
        if not isinstance(error, Refusal):
            if isinstance(error, Exception):
                log.exception("%s for %s failed", self._rpc, ip, exc_info=error)
                self._count("INTERNAL")
            else:  # cancelled: counted as before, under the status gRPC gives it
                self._count("OK")
            return False
        refusal = error
        outcome = refusal.code.name
        if refusal.reason is not None:
            metrics.DENIALS.labels(reason=refusal.reason.value).inc()
        log.info("%s for %s refused (%s): %s", self._rpc, ip, outcome, refusal.message)
        self._count(outcome)
        # kiam agents read the status alone; podiam's agent also labels its refusal by rule.
        trailer = () if refusal.reason is None else ((REASON_METADATA, refusal.reason.value),)
        await self._context.abort(refusal.code, refusal.message, trailing_metadata=trailer)
        return False

    def _count(self, outcome: str) -> None:
        metrics.REQUESTS.count(self._rpc, outcome, time.perf_counter() - self._started)
