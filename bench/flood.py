"""A connection flood from one pod: ``python -m bench.flood`` reads a JSON spec on stdin, holds
``connections`` connections from ``source`` to the agent for ``seconds``, each asking for
credentials on keep-alive as fast as it is answered and reconnecting whenever the agent closes
or resets it; prints one JSON line of what it got.

Spec: ``{"host", "port", "source", "path", "connections", "seconds"}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter

from bench.procs import pin, raise_open_files_limit


async def run(spec: dict) -> dict:
    host, port, source = spec["host"], spec["port"], spec["source"]
    request = f"GET {spec['path']} HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n".encode()
    deadline = time.monotonic() + float(spec["seconds"])
    outcomes: Counter[str] = Counter()

    async def one() -> None:
        while time.monotonic() < deadline:
            try:
                reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
            except OSError:
                outcomes["connect-failed"] += 1
                await asyncio.sleep(0.01)
                continue
            try:
                while time.monotonic() < deadline:
                    writer.write(request)
                    head = await reader.readuntil(b"\r\n\r\n")
                    outcomes[head[9:12].decode()] += 1
                    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    await reader.readexactly(length)
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                outcomes["closed"] += 1
            finally:
                writer.close()
            # Reconnect at once would make this process (which shares the load generator's
            # core) the bottleneck of the victim's measurement rather than the agent.
            await asyncio.sleep(0.1)

    print("go", flush=True)
    await asyncio.gather(*(one() for _ in range(int(spec["connections"]))))
    return dict(outcomes)


def main() -> None:
    spec = json.loads(sys.stdin.read())
    pin(spec.get("cpu"))
    raise_open_files_limit()
    import uvloop

    print(json.dumps(uvloop.run(run(spec))), flush=True)


if __name__ == "__main__":
    main()
