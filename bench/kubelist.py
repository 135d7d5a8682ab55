"""The Kubernetes API server's own share of an initial sync: list every unfinished pod, page by
page as podiam-server does (same page size, same field selector), and throw the bodies away.

    python -m bench.kubelist --url URL [--page-size N]   # prints one JSON line

What this takes is the floor for podiam-server's sync against that API server: the API server
producing the pages, plus the transfer, with no decoding at all on the client side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp

from server.pods import UNFINISHED_PODS
from tests.support.kubeapi import DEFAULT_TOKEN


async def list_all(url: str, page_size: int) -> dict:
    started = time.perf_counter()
    pages = size = 0
    token = ""
    headers = {"Authorization": f"Bearer {DEFAULT_TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        while True:
            query = {"limit": str(page_size), "fieldSelector": UNFINISHED_PODS}
            if token:
                query["continue"] = token
            async with session.get(f"{url}/api/v1/pods", params=query) as response:
                body = await response.read()
            pages += 1
            size += len(body)
            # The continue token sits in the metadata, ahead of the items: no full parse needed.
            head = body[: body.find(b'"items"')] + b'"items":[]}'
            token = json.loads(head)["metadata"].get("continue") or ""
            if not token:
                break
    return {"seconds": time.perf_counter() - started, "pages": pages, "bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--page-size", type=int, default=500)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(list_all(args.url, args.page_size))), flush=True)


if __name__ == "__main__":
    main()
