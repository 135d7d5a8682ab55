"""A TCP proxy that tests can break: cut every connection, refuse new ones for a while, or
stall — a partition: connections stay open and new ones are accepted, but no byte gets through,
so nothing fails until a timeout or a keepalive notices.

A watch that dies because the network did is the same event whichever API server is behind it,
so the shared Kubernetes scenarios break watches here, in front of the test double and the real
API server alike (TLS passes through untouched). Neither server offers a way to drop one
client's connections from outside; a proxy is how the network does it.
"""

from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target_host:target_port``, byte for byte."""

    def __init__(self, target_host: str, target_port: int, *, source: str | None = None) -> None:
        self.target_host = target_host
        # The address upstream connections come from (another 127.x address plays another node).
        self.source = source
        self.target_port = target_port
        self.port = 0
        self.accepting = True
        self.stalled = False
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.connections = 0  # accepted and forwarded, ever
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def cut(self) -> None:
        """Break every open connection at once, as a dropped network path does."""
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                writer.transport.abort()
        self._writers.clear()

    def refuse(self) -> None:
        """Cut everything and close each new connection at once, until ``accept``."""
        self.accepting = False
        self.cut()

    def accept(self) -> None:
        self.accepting = True

    def stall(self) -> None:
        """Let nothing through, in either direction, on open or new connections, until
        ``flow``: what a pulled cable or a dropped route looks like from either end."""
        self.stalled = True
        self._flowing.clear()

    def flow(self) -> None:
        self.stalled = False
        self._flowing.set()

    @contextlib.contextmanager
    def down(self):
        """The network is down for the duration of the block."""
        self.refuse()
        try:
            yield
        finally:
            self.accept()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._flowing.wait()  # a stalled network: the connection goes nowhere yet
        if not self.accepting:
            writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                self.target_host,
                self.target_port,
                local_addr=(self.source, 0) if self.source else None,
            )
        except OSError:
            writer.transport.abort()
            return
        if not self.accepting:  # refused while connecting
            writer.transport.abort()
            upstream_writer.transport.abort()
            return
        self.connections += 1
        self._writers.update((writer, upstream_writer))
        pipes = [
            asyncio.create_task(self._pipe(reader, upstream_writer)),
            asyncio.create_task(self._pipe(upstream_reader, writer)),
        ]
        self._pipes.update(pipes)
        try:
            await asyncio.gather(*pipes, return_exceptions=True)
        finally:
            self._pipes.difference_update(pipes)
            for end in (writer, upstream_writer):
                self._writers.discard(end)
                end.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()  # bytes sent into a partition arrive after it, if ever
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            # One direction ended: end the other too, so neither side waits forever.
            writer.transport.abort()
