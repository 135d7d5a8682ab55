"""How long a new pod waits for credentials: from the moment the server first sees it active
(with an IP, permitted a role) to the moment its credentials first go out to its node's agent
(over the node stream) or to the pod itself (a unary call) — the delay podiam adds to a pod's
start, as ``podiam_pod_first_credentials_seconds``.

The two ends are facts other modules already know: the registry sees a pod become active, and
the audit trail records each pod the first time it is served. This joins them with one
timestamp per pod still waiting. Pods listed when the server starts are not timed: they started
before this server did, and were served by another replica meanwhile. Nor are pods on nodes
whose agents hold no node stream to this replica (with three replicas or more, each serves only
some nodes): the replica those agents follow times them, and this one keeps no timestamp that
nothing would ever close.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from server.metrics import POD_FIRST_CREDENTIALS
from server.pods import PodRecord


class FirstCredentialsTimer:
    def __init__(
        self,
        *,
        streams: Callable[[str], int] = lambda host_ip: 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # Node streams open for a node (NodeFanout.streams); may be set after construction, as
        # the server builds the fan-out after the audit trail that reports to this timer.
        self.streams = streams
        self._clock = clock
        self._armed = False
        self._waiting: dict[str, float] = {}  # pod uid → when it was first seen active

    def arm(self) -> None:
        """Time pods that become active from now on (called once the first list is done)."""
        self._armed = True

    def active(self, pod: PodRecord) -> None:
        if self._armed and self.streams(pod.host_ip):
            self._waiting.setdefault(pod.uid, self._clock())

    def served(self, pod: PodRecord) -> None:
        started = self._waiting.pop(pod.uid, None)
        if started is not None:
            POD_FIRST_CREDENTIALS.observe(self._clock() - started)

    def gone(self, pod: PodRecord) -> None:
        self._waiting.pop(pod.uid, None)
