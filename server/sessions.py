"""What a pod's STS session is called: the choice that decides how many AssumeRole calls a
cluster costs.

Pods whose identities are equal share one set of credentials and one AssumeRole per refresh, so
the session name is the dial between economy and attribution. Named after the pod, every replica
is its own session (AssumeRole calls grow with pods); named after the pod's workload, all
replicas of a Deployment share one (calls grow with workloads); one fixed name per role is
kiam's economy and loses who-was-who in CloudTrail. Attribution does not have to come from the
name: session tags and the audit trail (server/audit.py) carry it whatever the name is.
"""

from __future__ import annotations

import enum

from server.pods import PodRecord
from server.policy import SessionNamer, SessionTagger
from server.sts import sanitised_session_name, session_name_for


class SessionNameFrom(enum.StrEnum):
    # <prefix>-<workload name> (a bare pod: its name): replicas share a session. Namespaces are
    # not in the name (64 characters go fast); the kubernetes-namespace tag and the audit trail
    # carry them.
    WORKLOAD = "workload"
    POD = "pod"  # <prefix>-<pod name>: one session per pod
    FIXED = "fixed"  # <prefix>: one session per role (and external id, and tags)


def session_namer(source: SessionNameFrom, prefix: str) -> SessionNamer:
    """The pod → RoleSessionName function for ``--session-name-from``. A pod's
    iam.amazonaws.com/session-name annotation wins in every mode."""

    def name(pod: PodRecord) -> str:
        if pod.session_name:
            return session_name_for(prefix, pod.session_name)
        if source is SessionNameFrom.POD:
            return session_name_for(prefix, pod.name)
        if source is SessionNameFrom.WORKLOAD:
            return session_name_for(prefix, pod.workload_name)
        return sanitised_session_name(prefix)

    return name


# STS session tags: keys up to 128 characters, values up to 256, both of Unicode letters,
# separators and digits and `_ . : / = + - @`.
TAG_KEY_MAX = 128
TAG_VALUE_MAX = 256
_TAG_PUNCTUATION = frozenset("_.:/=+-@")
SessionTags = tuple[tuple[str, str], ...]


def sanitised_tag_value(value: str) -> str:
    """``value`` as STS accepts a tag value: other characters become `_`, cut to 256."""
    return "".join(
        c if c.isalnum() or c.isspace() or c in _TAG_PUNCTUATION else "_"
        for c in value[:TAG_VALUE_MAX]
    )


def session_tagger(*, per_pod: bool, cluster_name: str = "") -> SessionTagger:
    """The pod → session tags function for ``--session-tags``, with the keys EKS Pod Identity
    uses where they exist. Pod name and uid only when sessions are per pod: a tag that differs
    between replicas would make each replica its own identity again."""
    cluster = sanitised_tag_value(cluster_name)

    def tags(pod: PodRecord) -> SessionTags:
        pairs = {
            "kubernetes-namespace": pod.namespace,
            "kubernetes-service-account": pod.service_account,
            "kubernetes-workload": pod.workload,
        }
        if per_pod:
            pairs["kubernetes-pod-name"] = pod.name
            pairs["kubernetes-pod-uid"] = pod.uid
        if cluster:
            pairs["kubernetes-cluster"] = cluster
        return tuple(sorted((k, sanitised_tag_value(v)) for k, v in pairs.items() if v))

    return tags
