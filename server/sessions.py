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
from server.policy import SessionNamer
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
