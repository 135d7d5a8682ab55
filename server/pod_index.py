"""The pods the watch reports, and the three ways the server finds them: by IP (the question
every request asks), by node (what one agent serves) and by namespace (whose grants a change of
``permitted`` revisits).

Only *active* pods are found by IP or node (see ``PodRecord.active``): a finished pod's IP may
already be another pod's, and a hostNetwork pod's IP is its node's. Every pod, active or not, is
found by namespace, because a pod without an IP yet still holds its identity (the prefetch) and
must be re-granted with the others. The index decides nothing; the registry does.

It holds every pod of the cluster, so each entry is kept small: the IP index maps an IP to the
one key that holds it — the common case — and only an IP held by several pods (the rare,
refused, ambiguous case) to a ``_Several`` of keys.
"""

from __future__ import annotations

from collections.abc import Iterable

from server.pods import PodRecord

PodKey = tuple[str, str]  # (namespace, name)


class _Several(tuple):
    """The keys of the active pods that share one IP (a PodKey is a tuple too: this tells the
    two apart)."""

    __slots__ = ()


class PodIndex:
    def __init__(self) -> None:
        self.pods: dict[PodKey, PodRecord] = {}
        self._by_ip: dict[str, PodKey | _Several] = {}
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
        members = self._by_namespace.get(pod.namespace)
        if members is None:
            members = self._by_namespace[pod.namespace] = set()
        members.add(key)
        if pod.active:
            held = self._by_ip.get(pod.ip)
            if held is None:
                self._by_ip[pod.ip] = key
            else:
                self._by_ip[pod.ip] = _Several((*_keys(held), key))
            members = self._by_node.get(pod.host_ip)
            if members is None:
                members = self._by_node[pod.host_ip] = set()
            members.add(key)

    def holders(self, ip: str) -> tuple[PodKey, ...]:
        """The active pods that have ``ip``: none, one, or (ambiguous) several."""
        held = self._by_ip.get(ip)
        return () if held is None else _keys(held)

    def sole_holder(self, ip: str) -> PodKey | None:
        """The active pod that has ``ip`` when exactly one does (the hot lookup: no tuple is
        made); None when none or several do."""
        held = self._by_ip.get(ip)
        return None if held is None or type(held) is _Several else held

    def on_node(self, host_ip: str) -> Iterable[PodKey]:
        """The active pods of a node."""
        return self._by_node.get(host_ip, ())

    def in_namespace(self, namespace: str) -> list[PodKey]:
        """Every pod of a namespace, as a list the caller may hold while the index changes."""
        return list(self._by_namespace.get(namespace, ()))

    def _unindex(self, key: PodKey, pod: PodRecord) -> None:
        _discard(self._by_namespace, pod.namespace, key)
        if pod.active:
            remaining = tuple(k for k in self.holders(pod.ip) if k != key)
            if len(remaining) > 1:
                self._by_ip[pod.ip] = _Several(remaining)
            elif remaining:
                self._by_ip[pod.ip] = remaining[0]
            else:
                self._by_ip.pop(pod.ip, None)
            _discard(self._by_node, pod.host_ip, key)


def _keys(held: PodKey | _Several) -> tuple[PodKey, ...]:
    return held if type(held) is _Several else (held,)


def _discard(index: dict[str, set[PodKey]], name: str, key: PodKey) -> None:
    members = index.get(name)
    if members is not None:
        members.discard(key)
        if not members:
            del index[name]
