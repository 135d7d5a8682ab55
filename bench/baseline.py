"""The baselines the agent is compared with, each answering the same two requests with the
same bytes and content types, and nothing else — no path checks, no lookup, no token check, no
limits, no metrics. ``python -m bench.baseline --kind aiohttp|raw --port N --role-body-file F
--credentials-body-file F``; prints ``listening`` when ready.

- ``aiohttp``: a bare aiohttp server served the way the agent served before its own listener
  (one catch-all route, the default asyncio event loop, no access log).
- ``raw``: the fastest a Python server of this API can be: an asyncio protocol on httptools
  and uvloop writing two responses rendered at start-up. The agent's listener is built the
  same way, so the difference between the two is podiam's own work per request.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from aiohttp import web


async def serve(host: str, port: int, role: bytes, credentials: bytes) -> None:
    role_text = role.decode()

    async def handle(request: web.Request) -> web.Response:
        if request.raw_path.endswith("/"):
            return web.Response(text=role_text, content_type="text/plain")
        return web.Response(body=credentials, content_type="text/plain")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    print("listening", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def _rendered(body: bytes) -> tuple[bytes, bytes]:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n" % len(body)
    return head + b"\r\n" + body, head + b"Connection: close\r\n\r\n" + body


async def serve_raw(host: str, port: int, role: bytes, credentials: bytes) -> None:
    import httptools

    role_answers, credentials_answers = _rendered(role), _rendered(credentials)

    class Raw(asyncio.Protocol):
        def connection_made(self, transport) -> None:
            self.transport = transport
            self.parser = httptools.HttpRequestParser(self)
            self.url = b""

        def data_received(self, data: bytes) -> None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                self.transport.close()

        def on_message_begin(self) -> None:
            self.url = b""

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_message_complete(self) -> None:
            answers = role_answers if self.url.endswith(b"/") else credentials_answers
            if self.parser.should_keep_alive():
                self.transport.write(answers[0])
            else:
                self.transport.write(answers[1])
                self.transport.close()

    server = await asyncio.get_running_loop().create_server(Raw, host, port, backlog=1024)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=("aiohttp", "raw"), default="aiohttp")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--role-body-file", type=Path, required=True)
    parser.add_argument("--credentials-body-file", type=Path, required=True)
    args = parser.parse_args()
    role, credentials = args.role_body_file.read_bytes(), args.credentials_body_file.read_bytes()
    try:
        if args.kind == "raw":
            import uvloop

            uvloop.run(serve_raw(args.host, args.port, role, credentials))
        else:
            asyncio.run(serve(args.host, args.port, role, credentials))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
