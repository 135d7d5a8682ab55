"""The pods the watch reports, and the three ways the server finds them: by IP (the question
every request asks), by node (what one agent serves) and by namespace (whose grants a change of
``permitted`` revisits).

Only *active* pods are found by IP or node (see ``PodRecord.active``): a finished pod's IP may
already be another pod's, and a hostNetwork pod's IP is its node's. Every pod, active or not, is
found by namespace, because a pod without an IP yet still holds its identity (the prefetch) and
must be re-granted with the others. The index decides nothing; the registry does.
"""

from __future__ import annotations

from collections.abc import Iterable

from server.pods import PodRecord

PodKey = tuple[str, str]  # (namespace, name)


class PodIndex:
    def __init__(self) -> None:
        self.pods: dict[PodKey, PodRecord] = {}
        # A tuple, not a set: the hot lookup reads it without allocating, and an IP is held by
        # more than one active pod only in the rare, refused, ambiguous case.
        self.by_ip: dict[str, tuple[PodKey, ...]] = {}
        self._by_node: dict[str, set[PodKey]] = {}
        self._by_namespace: dict[str, set[PodKey]] = {}

    def __len__(self) -> int:
        return len(self.pods)

    def get(self, key: PodKey) -> PodRecord | None:
        return self.pods.get(key)

    def put(self, key: PodKey, pod: PodRecord | None) -> None:
        """Store ``pod`` under ``key``, or with None forget the pod stored there."""
        old = self.pods.get(key)
        if old is not None:
            self._unindex(key, old)
        if pod is None:
            self.pods.pop(key, None)
            return
        self.pods[key] = pod
        self._by_namespace.setdefault(pod.namespace, set()).add(key)
        if pod.active:
            self.by_ip[pod.ip] = (*self.by_ip.get(pod.ip, ()), key)
            self._by_node.setdefault(pod.host_ip, set()).add(key)

    def holders(self, ip: str) -> tuple[PodKey, ...]:
        """The active pods that have ``ip``: none, one, or (ambiguous) several."""
        return self.by_ip.get(ip, ())

    def on_node(self, host_ip: str) -> Iterable[PodKey]:
        """The active pods of a node."""
        return self._by_node.get(host_ip, ())

    def in_namespace(self, namespace: str) -> list[PodKey]:
        """Every pod of a namespace, as a list the caller may hold while the index changes."""
        return list(self._by_namespace.get(namespace, ()))

    def _unindex(self, key: PodKey, pod: PodRecord) -> None:
        _discard(self._by_namespace, pod.namespace, key)
        if pod.active:
            remaining = tuple(k for k in self.by_ip.get(pod.ip, ()) if k != key)
            if remaining:
                self.by_ip[pod.ip] = remaining
            else:
                self.by_ip.pop(pod.ip, None)
            _discard(self._by_node, pod.host_ip, key)


def _discard(index: dict[str, set[PodKey]], name: str, key: PodKey) -> None:
    members = index.get(name)
    if members is not None:
        members.discard(key)
        if not members:
            del index[name]
