"""The server's picture of the cluster: pods and namespaces as the watches report them, what
each pod is granted, and who must hear about changes.

It is the sink of both Kubernetes reflectors. Every change goes through ``_store_pod``, which
keeps the indexes (active pod by IP, pods by node, by namespace, by identity), takes and releases
credential identities in the cache (so credentials are fetched the moment a pod appears and
dropped when the last pod using them goes), and marks the IPs that changed on the node streams
of the affected nodes. Nothing here awaits: it runs on the event loop between watch events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from server import metrics
from server.arn import RoleResolver
from server.identity import AwsCredentials, RoleIdentity
from server.pods import (
    NamespaceRecord,
    PodRecord,
    namespace_from_object,
    object_key,
    pod_from_object,
)
from server.policy import Denial, Grant, Reason, SessionNamer, grant_for_pod

log = logging.getLogger(__name__)

_FINISHED = frozenset({"Succeeded", "Failed"})

PodKey = tuple[str, str]


class CredentialsHolder(Protocol):
    def acquire(self, identity: RoleIdentity) -> None: ...
    def release(self, identity: RoleIdentity) -> None: ...
    def peek(self, identity: RoleIdentity) -> AwsCredentials | None: ...


@dataclass(slots=True, eq=False)
class NodeWatch:
    """One agent's subscription to its node. Changes are coalesced into sets, so a slow agent
    costs memory proportional to its node's pods, never to the number of events."""

    host_ip: str
    dirty_ips: set[str] = field(default_factory=set)
    dirty_identities: set[str] = field(default_factory=set)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False

    def take(self) -> tuple[set[str], set[str]]:
        ips, identities = self.dirty_ips, self.dirty_identities
        self.dirty_ips, self.dirty_identities = set(), set()
        self.changed.clear()
        return ips, identities


@dataclass(frozen=True, slots=True)
class Lookup:
    """A pod found by IP, with what it is granted; or the denial when none can be named."""

    pod: PodRecord | None = None
    grant: Grant | None = None
    denial: Denial | None = None


class Registry:
    def __init__(
        self,
        *,
        resolver: RoleResolver,
        session_name: SessionNamer,
        credentials: CredentialsHolder,
        allowed_accounts: frozenset[str] = frozenset(),
        on_denied: Callable[[PodRecord, Denial], None] | None = None,
        on_namespace_denied: Callable[[NamespaceRecord, Denial], None] | None = None,
    ) -> None:
        self.resolver = resolver
        self._session_name = session_name
        self._credentials = credentials
        self._allowed_accounts = allowed_accounts
        self._on_denied = on_denied
        self._on_namespace_denied = on_namespace_denied
        self._invalid_namespaces: set[str] = set()
        self.pods: dict[PodKey, PodRecord] = {}
        self._grants: dict[PodKey, Grant] = {}
        self._by_ip: dict[str, tuple[PodKey, ...]] = {}
        self._by_node: dict[str, set[PodKey]] = {}
        self._by_namespace: dict[str, set[PodKey]] = {}
        self._by_role: dict[str, set[PodKey]] = {}  # role ARN → pods holding credentials
        self.namespaces: dict[str, NamespaceRecord] = {}
        self._watches: dict[str, set[NodeWatch]] = {}
        self._closed = False
        self.pod_sink = _Sink(self._upsert_pod_object, self._delete_pod_key, self.pods.keys)
        self.namespace_sink = _Sink(
            self._upsert_namespace_object,
            self._delete_namespace_key,
            lambda: (("", name) for name in self.namespaces),
        )

    # ---- lookups (the gRPC service) -------------------------------------------------------

    def lookup(self, ip: str) -> Lookup:
        keys = self._by_ip.get(ip)
        if not keys:
            return Lookup(denial=Denial(Reason.UNKNOWN_POD, f"no active pod has IP {ip}"))
        if len(keys) > 1:
            names = ", ".join(f"{ns}/{name}" for ns, name in keys)
            return Lookup(
                denial=Denial(Reason.AMBIGUOUS_IP, f"IP {ip} is held by several pods: {names}")
            )
        key = keys[0]
        return Lookup(pod=self.pods[key], grant=self._grants[key])

    # ---- node streams -----------------------------------------------------------------------

    def subscribe(self, host_ip: str) -> NodeWatch:
        watch = NodeWatch(host_ip, closed=self._closed)
        self._watches.setdefault(host_ip, set()).add(watch)
        metrics.NODE_STREAMS.inc()
        return watch

    def close_watches(self) -> None:
        """End every node stream (at shutdown), so agents reconnect to another replica at once
        instead of waiting for the grace period to run out."""
        self._closed = True
        for watches in self._watches.values():
            for watch in watches:
                watch.closed = True
                watch.changed.set()

    def unsubscribe(self, watch: NodeWatch) -> None:
        watches = self._watches.get(watch.host_ip)
        if watches and watch in watches:
            watches.discard(watch)
            if not watches:
                del self._watches[watch.host_ip]
            metrics.NODE_STREAMS.dec()

    def node_ips(self, host_ip: str) -> Iterator[str]:
        for key in self._by_node.get(host_ip, ()):
            yield self.pods[key].ip

    def node_identities(self, host_ip: str) -> set[RoleIdentity]:
        """Identities that pods on this node are granted: what its agent should hold."""
        found = set()
        for key in self._by_node.get(host_ip, ()):
            identity = self._grants[key].identity
            if identity is not None and len(self._by_ip.get(self.pods[key].ip, ())) == 1:
                found.add(identity)
        return found

    def state_on_node(self, ip: str, host_ip: str) -> tuple[PodRecord | None, Grant | None]:
        """What the agent of ``host_ip`` should answer for ``ip``: (None, None) when no active
        pod of that node has it, (pod, None) when the IP is ambiguous."""
        keys = self._by_ip.get(ip, ())
        pods = [self.pods[key] for key in keys]
        mine = [pod for pod in pods if pod.host_ip == host_ip]
        if not mine:
            return None, None
        if len(pods) > 1:
            return mine[0], None
        return mine[0], self._grants[keys[0]]

    def credentials_changed(self, identity: RoleIdentity, _creds: AwsCredentials | None) -> None:
        """Called by the credentials cache when it stores or drops credentials."""
        hosts = {
            self.pods[key].host_ip
            for key in self._by_role.get(identity.role_arn, ())
            if self._grants[key].identity == identity
        }
        for host in hosts:
            for watch in self._watches.get(host, ()):
                watch.dirty_identities.add(identity.key)
                watch.changed.set()

    # ---- pods -------------------------------------------------------------------------------

    def _upsert_pod_object(self, obj: dict[str, Any]) -> PodKey:
        pod = pod_from_object(obj)
        key = pod.key
        # A finished pod's IP may already be reused; it is of no further interest.
        self._store_pod(key, None if pod.phase in _FINISHED else pod)
        return key

    def _delete_pod_key(self, key: PodKey) -> None:
        self._store_pod(key, None)

    def _store_pod(self, key: PodKey, new: PodRecord | None, *, regrant: bool = False) -> None:
        old = self.pods.get(key)
        if new == old and not regrant:
            return
        grant = self._grant(new) if new is not None else None
        self._move_identity(key, old, self._grants.get(key), new, grant)
        if old is not None:
            self._unindex(key, old)
        if new is None:
            self.pods.pop(key, None)
            self._grants.pop(key, None)
        else:
            self.pods[key] = new
            self._grants[key] = grant
            self._index(key, new)
        self._notify(old, new)
        if new is not None and new.active:
            self._report_denial(new, grant)
        metrics.PODS_INDEXED.set(len(self.pods))

    def _report_denial(self, pod: PodRecord, grant: Grant) -> None:
        # A pod with no role asks for nothing; everything else denied is worth an Event (the
        # recorder deduplicates repeats of the same pod and reason).
        denial = grant.denial
        if denial is None or denial.reason is Reason.NO_ROLE or self._on_denied is None:
            return
        self._on_denied(pod, denial)

    def _grant(self, pod: PodRecord) -> Grant:
        return grant_for_pod(
            pod,
            self.namespaces.get(pod.namespace),
            resolver=self.resolver,
            session_name=self._session_name,
            allowed_accounts=self._allowed_accounts,
        )

    def _move_identity(
        self,
        key: PodKey,
        old_pod: PodRecord | None,
        old_grant: Grant | None,
        new_pod: PodRecord | None,
        new_grant: Grant | None,
    ) -> None:
        """Keep the cache's reference counts and the by-role index in step with what the pod
        holds. The new identity is taken before the old one is released, so that a pod whose
        identity did not change never drops (and refetches) its cached credentials."""
        old = _held(old_pod, old_grant)
        new = _held(new_pod, new_grant)
        if new == old:
            return
        if new is not None:
            self._by_role.setdefault(new.role_arn, set()).add(key)
            self._credentials.acquire(new)
        if old is not None:
            if new is None or new.role_arn != old.role_arn:
                _discard(self._by_role, old.role_arn, key)
            self._credentials.release(old)

    def _index(self, key: PodKey, pod: PodRecord) -> None:
        self._by_namespace.setdefault(pod.namespace, set()).add(key)
        if pod.active:
            self._by_ip[pod.ip] = (*self._by_ip.get(pod.ip, ()), key)
            self._by_node.setdefault(pod.host_ip, set()).add(key)

    def _unindex(self, key: PodKey, pod: PodRecord) -> None:
        _discard(self._by_namespace, pod.namespace, key)
        if pod.active:
            remaining = tuple(k for k in self._by_ip.get(pod.ip, ()) if k != key)
            if remaining:
                self._by_ip[pod.ip] = remaining
            else:
                self._by_ip.pop(pod.ip, None)
            _discard(self._by_node, pod.host_ip, key)

    def _notify(self, old: PodRecord | None, new: PodRecord | None) -> None:
        if not self._watches:
            return
        for ip in {pod.ip for pod in (old, new) if pod is not None and pod.ip}:
            # Every node with a pod on this IP may see its answer change (ambiguity too).
            hosts = {pod.host_ip for pod in (old, new) if pod is not None}
            hosts.update(self.pods[key].host_ip for key in self._by_ip.get(ip, ()))
            for host in hosts:
                for watch in self._watches.get(host, ()):
                    watch.dirty_ips.add(ip)
                    watch.changed.set()

    # ---- namespaces -------------------------------------------------------------------------

    def _upsert_namespace_object(self, obj: dict[str, Any]) -> PodKey:
        record = namespace_from_object(obj)
        old = self.namespaces.get(record.name)
        self.namespaces[record.name] = record
        if old is None or old.permitted != record.permitted:
            self._report_pattern(record)
            self._regrant_namespace(record.name)
        metrics.NAMESPACES_INDEXED.set(len(self.namespaces))
        return ("", record.name)

    def _delete_namespace_key(self, key: PodKey) -> None:
        name = key[1]
        if self.namespaces.pop(name, None) is not None:
            self._invalid_namespaces.discard(name)
            metrics.NAMESPACES_INVALID_PERMITTED.set(len(self._invalid_namespaces))
            self._regrant_namespace(name)
        metrics.NAMESPACES_INDEXED.set(len(self.namespaces))

    def _report_pattern(self, record: NamespaceRecord) -> None:
        """A pattern that cannot be compiled permits nothing: say so once per change, in the
        log, the metric and an Event on the namespace, so its admin learns why."""
        if not record.error:
            self._invalid_namespaces.discard(record.name)
        else:
            self._invalid_namespaces.add(record.name)
            log.warning("namespace %s: %s", record.name, record.error)
            if self._on_namespace_denied is not None:
                self._on_namespace_denied(record, Denial(Reason.INVALID_PERMITTED, record.error))
        metrics.NAMESPACES_INVALID_PERMITTED.set(len(self._invalid_namespaces))

    def _regrant_namespace(self, name: str) -> None:
        for key in list(self._by_namespace.get(name, ())):
            self._store_pod(key, self.pods[key], regrant=True)


def _held(pod: PodRecord | None, grant: Grant | None) -> RoleIdentity | None:
    """The identity a pod holds in the cache. Pods that may ask soon hold theirs even before
    they have an IP (that is the prefetch); hostNetwork pods can never be told apart from their
    node, so they never hold one."""
    if pod is None or grant is None or pod.host_network or pod.phase in _FINISHED:
        return None
    return grant.identity


def _discard(index: dict[str, set[PodKey]], name: str, key: PodKey) -> None:
    members = index.get(name)
    if members is not None:
        members.discard(key)
        if not members:
            del index[name]


class _Sink:
    """Adapts the registry to the reflector's ObjectSink protocol, including the re-list
    bookkeeping: objects not seen again in a full list were deleted while the watch was away."""

    def __init__(
        self,
        upsert: Callable[[dict[str, Any]], PodKey],
        delete: Callable[[PodKey], None],
        stored: Callable[[], Iterable[PodKey]],
    ) -> None:
        self._upsert = upsert
        self._delete = delete
        self._stored = stored
        self._seen: set[PodKey] | None = None

    def begin_relist(self) -> None:
        self._seen = set()

    def upsert(self, obj: dict[str, Any]) -> None:
        key = self._upsert(obj)
        if self._seen is not None:
            self._seen.add(key)

    def delete(self, obj: dict[str, Any]) -> None:
        self._delete(object_key(obj))

    def end_relist(self) -> None:
        seen, self._seen = self._seen or set(), None
        for key in [key for key in self._stored() if key not in seen]:
            self._delete(key)
