"""The server's picture of the cluster: pods and namespaces as the watches report them, and what
each pod is granted.

It is the sink of both Kubernetes reflectors, and the one place a pod's grant is decided. Every
change to a pod goes through ``_store_pod``, which decides the pod's grant (server/policy.py),
moves the pod's hold on a credentials identity in the cache (so credentials are fetched the
moment a pod appears and dropped when the last pod using them goes), stores the pod in the index
(server/pod_index.py), tells the node fan-out which IPs changed on which nodes, and reports a
newly decided denial as an Event. A change to a namespace's ``permitted`` re-grants its pods.
Nothing here awaits: it runs on the event loop between watch events.

At 550,000 pods the grants are most of what a pod costs, and most pods share theirs with their
replicas: a grant depends only on the namespace, the role, the external id, the session name
and tags. So grants are kept per namespace by those inputs, and equal ones are one object —
one Grant and one RoleIdentity per workload, not per pod — until the namespace changes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from server import metrics
from server.arn import RoleResolver
from server.identity import RoleIdentity
from server.kube_sink import KeyedSink
from server.kube_wire import Namespace, Pod
from server.pod_index import PodIndex, PodKey
from server.pods import (
    NamespaceRecord,
    PodRecord,
    is_finished,
    namespace_from_object,
    pod_from_object,
)
from server.policy import Denial, Grant, Reason, SessionNamer, SessionTagger, grant_for_pod

log = logging.getLogger(__name__)

# Grants kept per namespace. When every pod is its own STS session (--session-name-from pod)
# no two pods share one, and the memo would only cost memory: past this many it starts over.
_GRANTS_KEPT_PER_NAMESPACE = 4096


class CredentialsHolder(Protocol):
    """Reference counts on identities: credentials are kept while any pod holds them."""

    def acquire(self, identity: RoleIdentity) -> None: ...
    def release(self, identity: RoleIdentity) -> None: ...


class PodChanges(Protocol):
    """Who must hear that what an IP names changed on some nodes (the node fan-out)."""

    @property
    def watching(self) -> bool: ...
    def ip_changed(self, ip: str, hosts: Iterable[str]) -> None: ...
    def identity_used(self, host_ip: str, identity: RoleIdentity, count: int) -> None:
        """``count`` more (or, negative, fewer) IPs on ``host_ip`` now name a pod granted
        ``identity``: the node's agent needs the identity while any does."""


class DenialRecorder(Protocol):
    """Where pod- and namespace-level denials are reported (Kubernetes Events)."""

    def record(self, pod: PodRecord, denial: Denial) -> None: ...
    def record_namespace(self, namespace: NamespaceRecord, denial: Denial) -> None: ...


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
        session_tags: SessionTagger | None = None,
        credentials: CredentialsHolder,
        changes: PodChanges | None = None,
        denials: DenialRecorder | None = None,
        allowed_accounts: frozenset[str] = frozenset(),
        on_pod_gone: Callable[[PodRecord], None] | None = None,
        on_pod_active: Callable[[PodRecord], None] | None = None,
    ) -> None:
        self.resolver = resolver
        self._on_pod_gone = on_pod_gone
        # Told when a pod permitted an identity becomes active (new, or its IP arrived).
        self._on_pod_active = on_pod_active
        self._session_name = session_name
        self._session_tags = session_tags
        self._credentials = credentials
        self._changes = changes
        self._denials = denials
        self._allowed_accounts = allowed_accounts
        self._index = PodIndex()
        # Read when scraped, not set on every change: one lock less per watch event.
        metrics.PODS_INDEXED.set_function(self._index.__len__)
        # The index's own dictionary, read directly by the hot lookup.
        self.pods = self._index.pods
        self._grants: dict[PodKey, Grant] = {}
        # Namespace → (namespace, role, external id, session name, tags) → the Grant.
        self._grant_memo: dict[str, dict[tuple, Grant]] = {}
        self.namespaces: dict[str, NamespaceRecord] = {}
        self._invalid_namespaces: set[str] = set()
        self.pod_sink = KeyedSink(
            wire=Pod,
            upsert=self._upsert_pod_object,
            delete=self._delete_pod_key,
            stored=self.pods.keys,
            upsert_page=self._upsert_pod_page,
        )
        self.namespace_sink = KeyedSink(
            wire=Namespace,
            upsert=self._upsert_namespace_object,
            delete=self._delete_namespace_key,
            stored=lambda: (("", name) for name in self.namespaces),
        )

    # ---- lookups (the gRPC service) -------------------------------------------------------

    def lookup(self, ip: str) -> Lookup:
        key = self._index.sole_holder(ip)
        if key is not None:
            return Lookup(pod=self.pods[key], grant=self._grants[key])
        keys = self._index.holders(ip)
        if not keys:
            return Lookup(denial=Denial(Reason.UNKNOWN_POD, f"no active pod has IP {ip}"))
        names = ", ".join(f"{ns}/{name}" for ns, name in keys)
        return Lookup(
            denial=Denial(Reason.AMBIGUOUS_IP, f"IP {ip} is held by several pods: {names}")
        )

    def decide(self, pod: PodRecord) -> Grant:
        """What ``pod`` would be granted now, for a pod read from the API but not (yet) seen
        by the watch."""
        return self._grant(pod)

    def pod(self, namespace: str, name: str) -> tuple[PodRecord | None, Grant | None]:
        """The pod stored under (namespace, name), active or not, and its grant; (None, None)
        when there is none. For those that know a pod by name, not by IP: token-bound
        credentials (by the name the token gives) and podiam-server explain."""
        key = (namespace, name)
        pod = self.pods.get(key)
        return (pod, self._grants.get(key)) if pod is not None else (None, None)

    def pods_with_ip(self, ip: str) -> tuple[PodKey, ...]:
        """The active pods that have ``ip``; more than one is the ambiguous case."""
        return self._index.holders(ip)

    # ---- what one node's agent should hold (the node streams) --------------------------------

    def node_ips(self, host_ip: str) -> Iterator[str]:
        for key in self._index.on_node(host_ip):
            yield self.pods[key].ip

    def node_identities(self, host_ip: str) -> set[RoleIdentity]:
        """Identities that pods on this node are granted: what its agent should hold."""
        return set(self.node_identity_uses(host_ip))

    def node_identity_uses(self, host_ip: str) -> dict[RoleIdentity, int]:
        """``node_identities`` with, for each, how many of the node's IPs name a pod granted
        it: a node stream starts from these counts and keeps them up to date from the
        ``identity_used`` announcements, instead of walking the node's pods on every change."""
        found: dict[RoleIdentity, int] = {}
        sole_holder = self._index.sole_holder
        for key in self._index.on_node(host_ip):
            identity = self._grants[key].identity
            if identity is not None and sole_holder(self.pods[key].ip) is not None:
                found[identity] = found.get(identity, 0) + 1
        return found

    def state_on_node(self, ip: str, host_ip: str) -> tuple[PodRecord | None, Grant | None]:
        """What the agent of ``host_ip`` should answer for ``ip``: (None, None) when no active
        pod of that node has it, (pod, None) when the IP is ambiguous."""
        # Asked for every IP of every node message: the sole holder (the common case) is looked
        # up without building the holders' tuple or any list.
        key = self._index.sole_holder(ip)
        if key is not None:
            pod = self.pods[key]
            if pod.host_ip != host_ip:
                return None, None
            return pod, self._grants[key]
        for key in self._index.holders(ip):  # none, or several: ambiguous
            pod = self.pods[key]
            if pod.host_ip == host_ip:
                return pod, None
        return None, None

    # ---- pods -------------------------------------------------------------------------------

    def _upsert_pod_object(self, obj: Pod | dict[str, Any]) -> PodKey:
        return self._put_pod_object(obj)

    def _upsert_pod_page(
        self, objects: Sequence[Pod | dict[str, Any]], on_error: Callable[[Any], None]
    ) -> list[PodKey]:
        """A page of a list, in one step."""
        keys = []
        put = self._put_pod_object
        for obj in objects:
            try:
                keys.append(put(obj))
            except Exception:
                on_error(obj)
        return keys

    def _put_pod_object(self, obj: Pod | dict[str, Any]) -> PodKey:
        pod = pod_from_object(obj)
        key = pod.key
        # A finished pod's IP may already be reused; it is of no further interest.
        self._store_pod(key, None if is_finished(pod.phase) else pod)
        return key

    def _delete_pod_key(self, key: PodKey) -> None:
        self._store_pod(key, None)

    def _store_pod(self, key: PodKey, new: PodRecord | None, *, regrant: bool = False) -> None:
        old = self._index.get(key)
        if new == old and not regrant:
            return
        changes = self._changes
        # The IPs whose answer may change, and what each gave its node before (see _publish).
        ips = _ips(old, new) if changes is not None and changes.watching else ()
        uses = [self._use(ip) for ip in ips]
        old_grant = self._grants.get(key)
        grant = self._grant(new) if new is not None else None
        self._move_identity(old, old_grant, new, grant)
        self._index.put(key, new)
        if new is None:
            self._grants.pop(key, None)
            if old is not None and self._on_pod_gone is not None:
                self._on_pod_gone(old)
        else:
            self._grants[key] = grant
            if (
                self._on_pod_active is not None
                and new.active
                and grant.identity is not None
                and (old is None or not old.active)
            ):
                self._on_pod_active(new)
        self._publish(old, new, ips, uses)
        self._report_denial(old, old_grant, new, grant)

    def _report_denial(
        self,
        old_pod: PodRecord | None,
        old_grant: Grant | None,
        new_pod: PodRecord | None,
        new_grant: Grant | None,
    ) -> None:
        """Report a pod's denial when it is decided: when the pod becomes active denied, or its
        reason changes, not again on every later update of the same pod. (The service reports
        only what depends on the request; see KiamService._permitted.)"""
        if self._denials is None or new_pod is None or new_grant is None:
            return
        reported = _reported(new_pod, new_grant)
        if reported is not None and reported != _reported(old_pod, old_grant):
            self._denials.record(new_pod, new_grant.denial)

    def _grant(self, pod: PodRecord) -> Grant:
        """The pod's grant: the one already decided for the same inputs in its namespace, or a
        new one. (The inputs are everything grant_for_pod reads of a pod.)"""
        tags = self._session_tags(pod) if self._session_tags is not None else ()
        inputs = (pod.role, pod.external_id, self._session_name(pod), tags)
        memo = self._grant_memo.get(pod.namespace)
        if memo is None:
            memo = self._grant_memo[pod.namespace] = {}
        grant = memo.get(inputs)
        if grant is None:
            grant = grant_for_pod(
                pod,
                self.namespaces.get(pod.namespace),
                resolver=self.resolver,
                session_name=self._session_name,
                session_tags=self._session_tags,
                allowed_accounts=self._allowed_accounts,
            )
            if len(memo) >= _GRANTS_KEPT_PER_NAMESPACE:
                memo.clear()
            memo[inputs] = grant
        return grant

    def _move_identity(
        self,
        old_pod: PodRecord | None,
        old_grant: Grant | None,
        new_pod: PodRecord | None,
        new_grant: Grant | None,
    ) -> None:
        """Keep the cache's reference counts in step with what the pod holds. The new identity
        is taken before the old one is released, so that a pod whose identity did not change
        never drops (and refetches) its cached credentials."""
        old = _held(old_pod, old_grant)
        new = _held(new_pod, new_grant)
        if new == old:
            return
        if new is not None:
            self._credentials.acquire(new)
        if old is not None:
            self._credentials.release(old)

    def _use(self, ip: str) -> tuple[str, RoleIdentity] | None:
        """What ``ip`` puts in its node's agent: (node, identity) when exactly one active pod
        has it and that pod is granted an identity; None otherwise."""
        key = self._index.sole_holder(ip)
        if key is None:
            return None
        identity = self._grants[key].identity
        return None if identity is None else (self.pods[key].host_ip, identity)

    def _publish(
        self,
        old: PodRecord | None,
        new: PodRecord | None,
        ips: Sequence[str],
        uses: Sequence[tuple[str, RoleIdentity] | None],
    ) -> None:
        """Tell the fan-out which IPs changed on which nodes, and which identity each IP gave
        its node before and gives it now, where that changed (``ips`` and ``uses`` as they
        were before the change)."""
        changes = self._changes
        if not ips or changes is None:
            return
        index, pods = self._index, self.pods
        for ip, before in zip(ips, uses, strict=True):
            # Every node with a pod on this IP may see its answer change (ambiguity too).
            hosts = {pod.host_ip for pod in (old, new) if pod is not None}
            sole = index.sole_holder(ip)  # the common case, found without a tuple
            if sole is not None:
                holder = pods[sole]
                hosts.add(holder.host_ip)
                identity = self._grants[sole].identity
                after = None if identity is None else (holder.host_ip, identity)  # as _use
            else:
                for key in index.holders(ip):
                    hosts.add(pods[key].host_ip)
                after = None
            changes.ip_changed(ip, hosts)
            if after != before:
                if before is not None:
                    changes.identity_used(before[0], before[1], -1)
                if after is not None:
                    changes.identity_used(after[0], after[1], 1)

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
            if self._denials is not None:
                self._denials.record_namespace(
                    record, Denial(Reason.INVALID_PERMITTED, record.error)
                )
        metrics.NAMESPACES_INVALID_PERMITTED.set(len(self._invalid_namespaces))

    def _regrant_namespace(self, name: str) -> None:
        self._grant_memo.pop(name, None)  # decided under the namespace as it was
        for key in self._index.in_namespace(name):
            self._store_pod(key, self.pods[key], regrant=True)


def _ips(old: PodRecord | None, new: PodRecord | None) -> tuple[str, ...]:
    """The IPs a change of a pod from ``old`` to ``new`` may concern, each once."""
    first = old.ip if old is not None else ""
    second = new.ip if new is not None else ""
    if first == second or not second:
        return (first,) if first else ()
    return (first, second) if first else (second,)


def _held(pod: PodRecord | None, grant: Grant | None) -> RoleIdentity | None:
    """The identity a pod holds in the cache. Pods that may ask soon hold theirs even before
    they have an IP (that is the prefetch); hostNetwork pods can never be told apart from their
    node, so they never hold one."""
    if pod is None or grant is None or pod.host_network or is_finished(pod.phase):
        return None
    return grant.identity


_NOT_REPORTED = frozenset({Reason.NO_ROLE, Reason.UNKNOWN_NAMESPACE})


def _reported(pod: PodRecord | None, grant: Grant | None) -> tuple[str, Reason] | None:
    """The Event a pod's grant calls for, as (pod uid, reason): one for each denial of an
    active pod, except "no role" (a pod with no role asks for nothing) and "unknown namespace".
    Pods and namespaces arrive on separate watches, so a pod is often seen before its namespace;
    that denial is transient by nature (no pod outlives its namespace), and an Event for it would
    stay on a pod that is permitted a moment later."""
    if pod is None or grant is None or grant.denial is None or not pod.active:
        return None
    if grant.denial.reason in _NOT_REPORTED:
        return None
    return (pod.uid, grant.denial.reason)
