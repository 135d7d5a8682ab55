"""The Kubernetes API server's own share of the watch-event rate: one bare watch of the pods, as
podiam-server holds it (same field selector), counting events and decoding nothing.

    python -m bench.kubewatch --url URL --count N   # prints "watching", then one JSON line

It starts watching from the current resourceVersion and prints ``watching``; the caller then
has the API server add N pods (bench/kubeproc.py ``add``). It prints ``{"seconds", "events",
"bytes"}`` once N events have arrived, the time counted from ``watching``, as
bench/nodestreams.py counts it: the API server creating, encoding and sending the events, the
floor for any watcher of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp

from server.pods import UNFINISHED_PODS
from tests.support.kubeapi import DEFAULT_TOKEN


async def watch(url: str, count: int) -> dict:
    headers = {"Authorization": f"Bearer {DEFAULT_TOKEN}"}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        query = {"limit": "1", "fieldSelector": UNFINISHED_PODS}
        async with session.get(f"{url}/api/v1/pods", params=query) as response:
            body = await response.read()
        head = body[: body.find(b'"items"')] + b'"items":[]}'
        version = json.loads(head)["metadata"]["resourceVersion"]
        query = {
            "watch": "true",
            "resourceVersion": version,
            "fieldSelector": UNFINISHED_PODS,
            "timeoutSeconds": "600",
        }
        async with session.get(f"{url}/api/v1/pods", params=query) as response:
            print("watching", flush=True)  # the caller adds the pods only now
            started = time.perf_counter()
            events = size = 0
            async for chunk in response.content.iter_any():
                size += len(chunk)
                events += chunk.count(b"\n")  # one event a line
                if events >= count:
                    break
    return {"seconds": time.perf_counter() - started, "events": events, "bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(watch(args.url, args.count))), flush=True)


if __name__ == "__main__":
    main()
