"""What one pod may cost the agent: the listener's limits, and the small counters behind them.

Every pod on a node shares one agent; before these limits one pod could starve the others
(1,100 idle connections exhausted the agent's open files, half-sent headers were held for
minutes, a connection flood pushed other pods past the SDKs' one-second budget). Each limit is
a flag (agent/config.py) and a count in ``podiam_agent_listener_limited_total{limit}`` when hit.

- connections per source IP and in total (the total also stays below the process's open-files
  limit, so the agent keeps descriptors for its own gRPC, netlink and iptables work);
- time to receive a request's headers, and how long an idle keep-alive connection is kept;
- header bytes, and body bytes (the metadata API takes no body);
- a per-pod token bucket of requests, far above what SDKs ask (they fetch credentials once
  per expiry window); over it a pod is answered 429 with ``Retry-After``.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from dataclasses import dataclass

from agent import metrics

# Descriptors kept for everything but pod connections: gRPC channels, netlink, iptables, logs.
RESERVED_FILES = 128


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    connections_per_ip: int = 64
    connections: int = 16384
    header_timeout: float = 5.0
    keepalive_timeout: float = 60.0
    header_bytes: int = 8192
    body_bytes: int = 1024
    # Requests per second, sustained, per pod, and how many at once: SDKs ask a few times per
    # credential refresh; a pod looping on the agent (or many CLI processes) far less than this.
    pod_rate: float = 2000.0
    pod_burst: int = 4000

    def total_connections(self) -> int:
        """``connections``, lowered to leave ``RESERVED_FILES`` below the open-files limit."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return self.connections
        return max(1, min(self.connections, soft - RESERVED_FILES))


def raise_open_files_limit() -> None:
    """Raise the soft open-files limit to the hard one: the default soft limit (1,024) is
    the first thing a connection flood exhausts, and raising it needs no privilege."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def hit(limit: str) -> None:
    metrics.LIMITED.labels(limit=limit).inc()


class PodBuckets:
    """A token bucket per source IP: ``rate`` tokens a second, at most ``burst`` held.

    One list per IP (tokens, last refill), updated in place; IPs whose bucket has refilled
    are forgotten by `forget_full`, which the listener calls periodically, so a pod that
    has gone takes no memory.
    """

    def __init__(self, *, rate: float, burst: int, clock=time.monotonic) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, list[float]] = {}
        self.enabled = rate > 0 and burst > 0

    def take(self, ip: str) -> float:
        """0.0 if the pod may make this request now; else the seconds until it may."""
        if not self.enabled:
            return 0.0
        now = self._clock()
        bucket = self._buckets.get(ip)
        if bucket is None:
            self._buckets[ip] = [self._burst - 1.0, now]
            return 0.0
        tokens = min(self._burst, bucket[0] + (now - bucket[1]) * self._rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return 0.0
        bucket[0] = tokens
        return (1.0 - tokens) / self._rate

    def forget_full(self) -> None:
        now = self._clock()
        full = [
            ip
            for ip, (tokens, last) in self._buckets.items()
            if tokens + (now - last) * self._rate >= self._burst
        ]
        for ip in full:
            del self._buckets[ip]

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after(seconds: float) -> int:
    """Whole seconds for ``Retry-After``: never 0, so a client does wait."""
    return max(1, math.ceil(seconds))


_MAX_KINDS = 4096


class OncePer:
    """A log line at most once per ``interval`` for one kind of event (a kind may name a
    pod), with how many were not logged since: a flood of bad requests or accept errors is one
    line per interval, never one line per event."""

    def __init__(self, log: logging.Logger, *, interval: float = 60.0, clock=time.monotonic):
        self._log = log
        self._interval = interval
        self._clock = clock
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, kind: str, level: int, message: str, *args: object) -> None:
        now = self._clock()
        if now < self._next.get(kind, 0.0):
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        if len(self._next) >= _MAX_KINDS:
            # Kinds may name a pod: forget those whose interval is over (their count with them).
            for stale in [k for k, at in self._next.items() if at <= now]:
                del self._next[stale]
                self._suppressed.pop(stale, None)
        self._next[kind] = now + self._interval
        suppressed = self._suppressed.pop(kind, 0)
        if suppressed:
            message += " (and %d more like it since the last such line)"
            args = (*args, suppressed)
        self._log.log(level, message, *args)
