"""The pod-facing HTTP/1.1 listener: an asyncio protocol on httptools (llhttp), for a tiny,
fixed API whose hot path is "look up the caller's IP, write pre-rendered bytes".

A general web framework built a request object, a response object, a handler task and a
header dictionary per request; here a request answered from memory costs the parser's
callbacks, one route-table call and one ``transport.write`` of bytes rendered when the
credentials arrived. Everything else — token PUTs, iam/info, health, the proxy, pods the
agent does not know yet — goes to the route table's async ``respond``, one task per request,
answers written in request order (pipelining).

What a route table provides (`RouteTable`): ``immediate`` answers synchronously from memory
or returns None, and ``respond`` answers anything. The listener knows nothing of the metadata
API, so the same class can serve another pod-facing API on another address.

The listener owns its accept loop instead of ``loop.create_server``: it checks the per-IP and
total connection limits before a transport exists (a flood costs an ``accept`` and a
``close``), and on EMFILE/ENFILE it stops accepting for a moment and logs once per interval —
not once per attempt, and without closing the listening socket (uvloop's own server closes
itself on such an error, silently: the agent would stop listening for good). Timeouts
(headers, keep-alive idle) are deadlines on each connection, checked by one periodic sweep
rather than a timer per request. Hostile input never reaches a 5xx: the parser's refusals
are 400/413/431, answered and logged as one rate-limited line.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

import httptools

from agent import metrics, wire
from agent.limits import ListenerLimits, OncePer, hit
from agent.request import Request

log = logging.getLogger(__name__)

# Errors that mean "out of descriptors or memory for now": stop accepting for a moment.
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_BACKOFF_SECONDS = 0.5
# Connections accepted per readiness event, so one flood cannot hold the loop.
ACCEPT_BATCH = 64
SWEEP_SECONDS = 0.5
MAX_HEADERS = 100
# Requests a client may queue on one connection (pipelined) before the listener stops reading.
MAX_PIPELINED = 32

_INTERNAL_ERROR = wire.text("internal error\n", 500)
# Listeners serving in this process: the connections gauge counts them all.
_SERVING: weakref.WeakSet[HttpListener] = weakref.WeakSet()
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class RouteTable(Protocol):
    def immediate(
        self, method: bytes, target: bytes, headers: dict[bytes, bytes], ip: str
    ) -> wire.Rendered | None:
        """The answer from memory, without awaiting anything; None to go to `respond`."""

    def respond(self, request: Request) -> Awaitable[wire.Response | wire.Rendered]:
        """Any answer; never raises for anything a client sent."""


class HttpListener:
    def __init__(
        self,
        routes: RouteTable,
        limits: ListenerLimits,
        *,
        name: str = "metadata API",
        on_accepted: Callable[[], None] | None = None,
    ):
        self.routes = routes
        # Called after each batch of accepted connections, before any of them is read: the
        # metadata API brings its view of the host routes up to date there (agent/hostroutes.py).
        self._on_accepted = on_accepted
        self.limits = limits
        self.name = name
        self.draining = False  # every answer from now on closes its connection
        self.connections: set[_Connection] = set()
        self.per_ip: dict[str, int] = {}
        self.open = 0  # connections accepted and not yet closed
        self.log_once = OncePer(log)
        self._total_limit = limits.total_connections()
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._resume: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()

    # ---- accepting ----------------------------------------------------------------------

    def serve(self, sock: socket.socket, *, backlog: int = 1024) -> None:
        """Listen on the bound ``sock`` (agent/listener.py) and accept from it."""
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        sock.listen(backlog)
        self._loop.add_reader(sock.fileno(), self._accept)
        self._sweeper = self._loop.call_later(SWEEP_SECONDS, self._sweep)
        _SERVING.add(self)

    def _accept(self) -> None:
        accepted = self._accept_batch()
        if accepted and self._on_accepted is not None:
            self._on_accepted()

    def _accept_batch(self) -> int:
        sock = self._sock
        if sock is None:
            return 0
        accepted = 0
        for _ in range(ACCEPT_BATCH):
            try:
                conn, address = sock.accept()
            except (BlockingIOError, InterruptedError):
                return accepted
            except OSError as error:
                if error.errno in _RESOURCE_ERRORS:
                    self._back_off(error)
                    return accepted
                # ECONNABORTED and the like: that one connection is gone, the next may not be.
                self.log_once("accept", logging.WARNING, "%s: accept failed: %s", self.name, error)
                continue
            ip = address[0]
            count = self.per_ip.get(ip, 0)
            if count >= self.limits.connections_per_ip:
                hit("connections-per-ip")
                self.log_once(
                    "per-ip",
                    logging.WARNING,
                    "%s: %s holds %d connections, the most one source may: closing new ones",
                    self.name,
                    ip,
                    count,
                )
                _reject(conn)
                continue
            if self.open >= self._total_limit:
                hit("connections")
                self.log_once(
                    "total",
                    logging.WARNING,
                    "%s: %d connections open, the most allowed: closing new ones",
                    self.name,
                    self._total_limit,
                )
                _reject(conn)
                continue
            self.per_ip[ip] = count + 1
            self.open += 1
            conn.setblocking(False)
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self._loop.create_task(self._adopt(conn, ip))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            accepted += 1
        return accepted

    async def _adopt(self, conn: socket.socket, ip: str) -> None:
        protocol = _Connection(self, ip)
        try:
            await self._loop.connect_accepted_socket(lambda: protocol, conn)
        except OSError:
            if not protocol.made:
                self._release(ip)
            conn.close()

    def _back_off(self, error: OSError) -> None:
        hit("accept-resources")
        self.log_once(
            "accept-resources",
            logging.WARNING,
            "%s: cannot accept connections (%s, %d open): pausing accepts for %.1fs",
            self.name,
            error.strerror or error,
            len(self.connections),
            ACCEPT_BACKOFF_SECONDS,
        )
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._resume = self._loop.call_later(ACCEPT_BACKOFF_SECONDS, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._resume = None
        if self._sock is not None:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def _release(self, ip: str) -> None:
        self.open -= 1
        count = self.per_ip.get(ip, 0) - 1
        if count > 0:
            self.per_ip[ip] = count
        else:
            self.per_ip.pop(ip, None)

    def _sweep(self) -> None:
        now = self._loop.time()
        for connection in list(self.connections):
            if connection.deadline <= now:
                connection.expire()
        forget = getattr(self.routes, "forget_idle", None)
        if forget is not None:
            forget()
        # One gauge for every pod-facing listener (the metadata API, token-bound credentials).
        metrics.CONNECTIONS.set(sum(len(serving.connections) for serving in _SERVING))
        self._sweeper = self._loop.call_later(SWEEP_SECONDS, self._sweep)

    # ---- stopping -----------------------------------------------------------------------

    def stop_accepting(self) -> None:
        """Stop accepting and close the listening socket: the other agent on the port, if
        any, takes the new connections."""
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        if self._sock is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def close_idle(self) -> None:
        for connection in list(self.connections):
            if connection.idle:
                connection.transport.close()

    async def close(self, *, drain_seconds: float) -> None:
        """Close idle connections, let requests in flight finish, then cut the rest."""
        self.stop_accepting()
        self.draining = True
        self.close_idle()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_seconds
        while any(c.busy for c in self.connections) and loop.time() < deadline:
            await asyncio.sleep(0.05)
            self.close_idle()
        for connection in list(self.connections):
            connection.transport.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
        _SERVING.discard(self)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _reject(conn: socket.socket) -> None:
    # An RST rather than a FIN: the pod's client fails at once instead of waiting for an
    # answer, and the agent keeps no TIME_WAIT state for it.
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.close()


class _Connection(asyncio.Protocol):
    """One pod connection: parse, answer in order, enforce the per-connection limits."""

    def __init__(self, listener: HttpListener, ip: str) -> None:
        self.listener = listener
        self.ip = ip
        self.limits = listener.limits
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.made = False
        self.deadline = float("inf")
        self.busy = False  # an async answer is being worked out
        self._fresh = True  # nothing received yet
        self._in_head = False  # a request began and its headers are not complete
        self._url = b""
        self._headers: dict[bytes, bytes] = {}
        self._head_bytes = 0
        self._raw_head = 0
        self._body_bytes = 0
        self._keep_alive = True
        self._method = b""
        self._queue: deque[tuple[Request, bool]] = deque()  # pipelined, with their keep-alive
        self._closing = False
        self._close_pending = False  # close once the answers in progress are written
        self._reading_paused = False
        self._writing_paused = False
        self._unread = 0  # answers written while the pod was not reading them

    # ---- transport events ---------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.made = True
        self.transport = transport
        self.listener.connections.add(self)
        self.deadline = self.listener._loop.time() + self.limits.header_timeout

    def connection_lost(self, exc) -> None:
        self._closing = True
        if self in self.listener.connections:
            self.listener.connections.discard(self)
            self.listener._release(self.ip)

    def pause_writing(self) -> None:
        # The pod does not read its answers: stop reading its requests until it does.
        self._writing_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._unread = 0
        if len(self._queue) < MAX_PIPELINED:
            self._resume_reading()

    def eof_received(self) -> bool | None:
        # A client that half-closes after its request still gets the answer being worked out.
        if self.busy:
            self._close_pending = True
            return True
        return None

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        if self._in_head:
            # Headers arriving in pieces: bound what the parser buffers before it can call
            # back (it holds an unfinished header value until the value ends). Generous, as
            # the piece may also hold pipelined requests after these headers.
            self._raw_head += len(data)
            if self._raw_head > 2 * self.limits.header_bytes:
                self._fail(431, "header-bytes", "request headers too large")
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # CONNECT, or an Upgrade header: answered as a plain request (refused), then closed.
            self._keep_alive = False
            self._close_when_done()
        except httptools.HttpParserError as error:
            if not self._closing:
                self._fail(400, "malformed", f"malformed request: {_describe(error)}")

    @property
    def idle(self) -> bool:
        return not self.busy and not self._in_head and not self._queue

    def expire(self) -> None:
        """The connection's deadline passed: headers too slow, or idle too long."""
        if self.busy or self._closing:
            return
        if self._in_head or self._fresh:
            hit("header-timeout")
            self._fail(408, "header-timeout", "request headers not received in time")
        else:
            hit("keepalive-timeout")
            self.transport.close()
            self._closing = True

    # ---- parser callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._fresh = False
        self._in_head = True
        self._url = b""
        self._headers = {}
        self._head_bytes = 0
        self._raw_head = 0
        self._body_bytes = 0
        if not self.busy:
            self.deadline = self.listener._loop.time() + self.limits.header_timeout

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        name = name.lower()
        if name not in self._headers:
            self._headers[name] = value
        if self._head_bytes > self.limits.header_bytes or len(self._headers) > MAX_HEADERS:
            self._fail(431, "header-bytes", "request headers too large")

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._closing:
            return
        self._method = self.parser.get_method()
        self._keep_alive = self.parser.should_keep_alive()
        if self._headers.get(b"expect", b"").lower() == b"100-continue":
            # Only for a body the agent will read: a larger one is refused when it arrives.
            length = self._headers.get(b"content-length", b"0")
            chunked = b"transfer-encoding" in self._headers
            if chunked or (length.isdigit() and 0 < int(length) <= self.limits.body_bytes):
                self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self.limits.body_bytes and not self._closing:
            hit("body-bytes")
            self._fail(413, "body-bytes", "request body too large")

    def on_message_complete(self) -> None:
        if self._closing:
            return
        if self.busy:
            if len(self._queue) >= 8 * MAX_PIPELINED:
                # More than a parser's chunk of requests nobody waits for: not a client.
                self._abort("pipelined")
                return
            self._queue.append((self._request(), self._keep_alive))
            if len(self._queue) >= MAX_PIPELINED:
                self._pause_reading()
            return
        try:
            rendered = self.listener.routes.immediate(
                self._method, self._url, self._headers, self.ip
            )
        except Exception:
            log.exception("%s: the hot path failed", self.listener.name)
            rendered = _INTERNAL_ERROR
        if rendered is not None:
            self._write(rendered, head=False)
            return
        self.busy = True
        self.deadline = float("inf")
        request = self._request()
        task = self.listener._loop.create_task(self._answer(request, self._keep_alive))
        self.listener._tasks.add(task)
        task.add_done_callback(self.listener._tasks.discard)

    # ---- answering ----------------------------------------------------------------------

    def _request(self) -> Request:
        return Request(
            method=self._method.decode("ascii", "replace"),
            target=self._url.decode("latin-1"),
            headers=self._headers,
            ip=self.ip,
        )

    async def _answer(self, request: Request, keep_alive: bool) -> None:
        routes = self.listener.routes
        while True:
            try:
                answer = await routes.respond(request)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s: answering %s failed", self.listener.name, request.method)
                answer = _INTERNAL_ERROR
            rendered = answer if isinstance(answer, wire.Rendered) else answer.render()
            self._write(rendered, head=request.method == "HEAD", keep_alive=keep_alive)
            if self._closing or not self._queue:
                break
            # Pipelined requests queued meanwhile, in order: from memory when they can be.
            request, keep_alive = self._queue.popleft()
            rendered = None
            if request.method == "GET":
                rendered = routes.immediate(
                    b"GET", request.target.encode("latin-1"), request.headers, request.ip
                )
            if rendered is not None:
                self._write(rendered, head=False, keep_alive=keep_alive)
                if self._closing or not self._queue:
                    break
                request, keep_alive = self._queue.popleft()
        self.busy = False
        if len(self._queue) < MAX_PIPELINED and not self._writing_paused:
            self._resume_reading()
        if self._close_pending:
            self._closing = True
            self.transport.close()
        elif not self._closing:
            self.deadline = self.listener._loop.time() + self.limits.keepalive_timeout

    def _close_when_done(self) -> None:
        if self.busy or self._queue:
            self._close_pending = True
        elif not self._closing:
            self._closing = True
            self.transport.close()

    def _write(self, rendered: wire.Rendered, *, head: bool, keep_alive: bool | None = None):
        if keep_alive is None:
            keep_alive = self._keep_alive
        transport = self.transport
        if transport.is_closing():
            return
        keep_alive = keep_alive and not self.listener.draining and not self._close_pending
        transport.write(rendered.bytes_for(keep_alive=keep_alive, head=head))
        if self._writing_paused:
            self._unread += 1
            if self._unread > 8 * MAX_PIPELINED:
                self._abort("unread")
                return
        if not keep_alive:
            self._closing = True
            self.transport.close()
        elif not self.busy:
            self.deadline = self.listener._loop.time() + self.limits.keepalive_timeout

    def _fail(self, status: int, reason: str, message: str) -> None:
        """A client error the connection cannot recover from: answer, close, log once."""
        if self._closing:
            return
        self._closing = True
        if reason in ("malformed", "header-bytes"):
            hit(reason)
        metrics.REQUESTS.count("invalid", status, 0.0)
        metrics.REFUSALS.labels(reason=reason).inc()
        self.listener.log_once(
            reason, logging.INFO, "%s: %s from %s: %d", self.listener.name, message, self.ip, status
        )
        if self.busy:
            # An answer is still being worked out for an earlier request: writing this one
            # now would answer that request with it. Close once that answer is written.
            self._close_pending = True
            return
        self.transport.write(wire.text(message + "\n", status).close)
        self.transport.close()

    def _abort(self, limit: str) -> None:
        hit(limit)
        self.listener.log_once(
            limit,
            logging.INFO,
            "%s: %s pipelines requests without reading the answers: connection cut",
            self.listener.name,
            self.ip,
        )
        self._closing = True
        self.transport.abort()

    def _pause_reading(self) -> None:
        if not self._reading_paused and not self._closing:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and not self._closing:
            self._reading_paused = False
            self.transport.resume_reading()


def _describe(error: Exception) -> str:
    """The parser's complaint, short and printable: it never echoes the request's bytes."""
    text = str(error) or type(error).__name__
    return text[:80].encode("ascii", "replace").decode()
