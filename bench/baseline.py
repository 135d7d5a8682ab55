"""The baseline the agent is compared with: a bare aiohttp server answering the same two
requests with the same bytes and content types, and nothing else — no path checks, no lookup,
no token check, no metrics. ``python -m bench.baseline --port N --role-body-file F
--credentials-body-file F``; prints ``listening`` when ready.

It is served the way the agent serves (one catch-all route, the default asyncio event loop, no
access log), so the difference between the two is podiam's own work per request.
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--role-body-file", type=Path, required=True)
    parser.add_argument("--credentials-body-file", type=Path, required=True)
    args = parser.parse_args()
    role, credentials = args.role_body_file.read_bytes(), args.credentials_body_file.read_bytes()
    try:
        asyncio.run(serve(args.host, args.port, role, credentials))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
