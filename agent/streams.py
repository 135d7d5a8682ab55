"""Two node streams, from two different server replicas, so that losing a replica loses no
request: the other stream already holds everything the node needs (agent/state.py merges them).

Each stream is pinned to one replica (agent/client.py). Before every attempt the replica list is
resolved again, so a replaced server pod is found by its new address; a stream never follows
the replica the other stream follows, and avoids replicas that failed a moment ago. With a
single replica the second stream stays idle and looks again every few seconds.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

from agent.client import ReplicaChooser, ServerClient, ServerConnection, StreamFollower
from agent.replicas import Endpoint, resolve
from agent.state import NodeState
from protos import kiam_pb2_grpc

STREAMS = 2
# A replica whose stream failed is avoided for this long when another one is available.
_AVOID_SECONDS = 30.0


class NodeStreams(ReplicaChooser):
    def __init__(
        self,
        connection: ServerConnection,
        state: NodeState,
        *,
        host_ip: str,
        server: str,
        on_synced: Callable[[], None] | None = None,
        count: int = STREAMS,
        first_update_seconds: float | None = None,
    ) -> None:
        self._connection = connection
        self._on_synced = on_synced
        # Set at the first synced snapshot from any replica: until then no credentials.
        self.synced_once = asyncio.Event()
        self._failed: dict[Endpoint, float] = {}
        self.client = ServerClient(connection, live_stub=self.live_stub)
        extra = (
            {} if first_update_seconds is None else {"first_update_seconds": first_update_seconds}
        )
        self.followers = [
            StreamFollower(
                self.client,
                state.view(),
                host_ip=host_ip,
                server=server,
                rotated=connection.subscribe_rotation(),
                on_synced=self._synced,
                connection=connection,
                chooser=self,
                alone=lambda: not state.live,
                spare=state.view(),
                **extra,
            )
            for _ in range(count)
        ]

    async def run(self) -> None:
        await asyncio.gather(*(follower.run() for follower in self.followers))

    def live_stub(self) -> kiam_pb2_grpc.KiamServiceStub | None:
        live = [follower.stub for follower in self.followers if follower.live]
        return random.choice(live) if live else None

    def endpoints(self) -> list[Endpoint]:
        """The replicas followed now."""
        return [f.endpoint for f in self.followers if f.endpoint is not None and f.live]

    async def choose(
        self, follower: StreamFollower, *, succeeding: bool = False
    ) -> Endpoint | None:
        """The replica ``follower`` follows next; ``succeeding``: for the stream that takes over
        from its current one at a recycle (which may be the same replica: the choice is made
        again so that recycles still spread agents over replicas)."""
        endpoints = await resolve(self._connection.addresses)
        taken = {
            endpoint
            for f in self.followers
            if f is not follower
            for endpoint in (f.endpoint, f.next_endpoint)
        }
        candidates = [endpoint for endpoint in endpoints if endpoint not in taken]
        if not candidates:
            return None
        now = time.monotonic()
        healthy = [e for e in candidates if now - self._failed.get(e, -1e9) >= _AVOID_SECONDS]
        chosen = random.choice(healthy or candidates)
        # Claimed before returning, so that the other stream, choosing at the same moment,
        # sees it taken.
        if succeeding:
            follower.next_endpoint = chosen
        else:
            follower.endpoint = chosen
        return chosen

    def failed(self, endpoint: Endpoint) -> None:
        self._failed[endpoint] = time.monotonic()

    def _synced(self) -> None:
        self.synced_once.set()
        if self._on_synced is not None:
            self._on_synced()
