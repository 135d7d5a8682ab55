"""``podiam-server`` flags: parsing and validation, testable without starting anything."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from runtime import imds
from runtime.flags import EnvDefaultsParser, duration, host_port
from server.arn import ACCOUNT, ArnError, is_role_arn, normalise_base_arn
from server.identity import MIN_REMAINING
from server.sessions import SessionNameFrom, sanitised_tag_value
from server.startup_taint import DEFAULT_KEY as DEFAULT_STARTUP_TAINT
from server.sts_budget import DEFAULT_BURST, DEFAULT_QPS

# STS limits on DurationSeconds.
STS_MIN_DURATION = timedelta(minutes=15)
STS_MAX_DURATION = timedelta(hours=12)
# Node streams: see --node-stream-linger. The upper bound stays below the agents' own wait for a
# pod they do not know yet (--pod-wait, 0.9s by default).
# Off: the bursts measured coalesce without it. It holds back only what gives an answer; what
# takes one away (a removal, a reused IP, a denial, withdrawn credentials) goes at once. (When it
# held back removals as well, the agent still answered a deleted pod's token: with 50 ms,
# tests/test_token_credentials.py failed in every run; tests/test_token_linger.py.)
DEFAULT_NODE_STREAM_LINGER = "0s"
MAX_NODE_STREAM_LINGER = timedelta(seconds=0.5)


# A label/taint key: an optional DNS-subdomain prefix and "/", then a name (Kubernetes'
# qualified name rules).
_TAINT_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")
_DNS_SUBDOMAIN = re.compile(
    r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*"
)


def is_taint_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if "/" in key and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix)):
        return False
    return bool(_TAINT_NAME.fullmatch(name))


@dataclass(frozen=True, slots=True)
class ServerConfig:
    bind: tuple[str, int]
    cert: Path
    key: Path
    ca: Path
    kubeconfig: str | None
    role_base_arn: str | None
    role_base_arn_autodetect: bool
    metadata_endpoint: str
    region: str | None
    sts_endpoint: str | None
    session_duration: timedelta
    session_refresh: timedelta
    session_name: str
    session_name_from: SessionNameFrom
    assume_role_arn: str | None
    allowed_accounts: frozenset[str]  # besides the base ARN's own account
    node_binding: bool
    startup_taint: str | None
    prometheus_listen_addr: tuple[str, int] | None
    max_connection_age: timedelta
    node_stream_linger: timedelta
    audit_log: str
    session_tags: bool
    transitive_session_tags: bool
    cluster_name: str
    sts_qps: float
    sts_burst: int
    token_credentials: bool
    token_audience: str
    webhook_bind: tuple[str, int] | None
    webhook_cert: Path | None
    webhook_key: Path | None
    webhook_endpoint: str
    webhook_token_expiration: timedelta
    log_level: str
    json_log: bool
    max_connection_age_grace: timedelta = timedelta(seconds=30)


def build_parser(environ: Mapping[str, str] | None = None) -> EnvDefaultsParser:
    parser = EnvDefaultsParser(
        prog="podiam-server",
        description=(
            "The podiam server: watches pods and namespaces, decides which pod may assume which "
            "IAM role (the namespace's iam.amazonaws.com/permitted regex against the pod's "
            "iam.amazonaws.com/role), fetches and caches STS credentials, and serves podiam and "
            "kiam agents over mutual-TLS gRPC."
        ),
        epilog="podiam-server explain NAMESPACE/POD asks a running server why a pod gets "
        "credentials or not (see podiam-server explain --help).",
        environ=environ,
    )
    flag = parser.add_flag
    flag(
        "--bind",
        env="PODIAM_BIND",
        type=host_port,
        default="0.0.0.0:443",
        help="address the gRPC server listens on",
    )
    parser.add_tls_flags(
        cert_help="PEM server certificate (serverAuth)",
        ca_help="PEM CA bundle that agent client certificates must chain to",
    )
    flag(
        "--kubeconfig",
        env="PODIAM_KUBECONFIG",
        default=None,
        help="kubeconfig file; default: in-cluster service account, then ~/.kube/config",
    )
    base = parser.add_mutually_exclusive_group()
    base.add_argument(
        "--role-base-arn",
        default=parser._environ.get("PODIAM_ROLE_BASE_ARN"),
        help="ARN prefix for role short names, e.g. "
        "arn:aws:iam::123456789012:role/ [env PODIAM_ROLE_BASE_ARN]",
    )
    base.add_argument(
        "--role-base-arn-autodetect",
        action="store_true",
        default=_env_switch(parser, "PODIAM_ROLE_BASE_ARN_AUTODETECT"),
        help="derive the base ARN from the node's instance profile, read from "
        "--metadata-endpoint [env PODIAM_ROLE_BASE_ARN_AUTODETECT]",
    )
    flag(
        "--metadata-endpoint",
        env="PODIAM_METADATA_ENDPOINT",
        default=imds.ENDPOINT,
        help="EC2 instance metadata service, used by --role-base-arn-autodetect",
    )
    flag(
        "--region",
        env="PODIAM_REGION",
        default=None,
        help="AWS region whose regional STS endpoint is used; default: the SDK's "
        "(AWS_REGION, AWS_DEFAULT_REGION)",
    )
    flag(
        "--sts-endpoint",
        env="PODIAM_STS_ENDPOINT",
        default=None,
        help="STS endpoint URL override, e.g. a VPC endpoint",
    )
    flag(
        "--session-duration",
        env="PODIAM_SESSION_DURATION",
        type=duration,
        default="1h",
        help="lifetime of the STS sessions podiam requests (15m to 12h; the role's maximum "
        "session duration must allow it)",
    )
    flag(
        "--session-refresh",
        env="PODIAM_SESSION_REFRESH",
        type=duration,
        default="35m",
        help="refresh credentials when this much lifetime remains; at least 30m, because SDKs "
        "treat credentials with under ~25m left as expiring",
    )
    flag(
        "--session-name",
        env="PODIAM_SESSION_NAME",
        default="podiam",
        help="prefix of STS session names: <prefix>-<pod's iam.amazonaws.com/session-name>, "
        "or else as --session-name-from says",
    )
    flag(
        "--session-name-from",
        env="PODIAM_SESSION_NAME_FROM",
        type=_session_name_from,
        metavar="{" + ",".join(source.value for source in SessionNameFrom) + "}",
        default=SessionNameFrom.WORKLOAD,
        help="what names a pod's STS session when it has no iam.amazonaws.com/session-name "
        "annotation: 'workload' (<prefix>-<Deployment, StatefulSet, DaemonSet, "
        "Job, CronJob or bare pod name>; replicas share one session and one AssumeRole per "
        "refresh), 'pod' (<prefix>-<pod name>; one AssumeRole per pod per refresh) or 'fixed' "
        "(<prefix>; one per role, as kiam)",
    )
    flag(
        "--assume-role-arn",
        env="PODIAM_ASSUME_ROLE_ARN",
        default=None,
        help="an intermediate role the server assumes first and uses to assume pod roles",
    )
    parser.add_argument(
        "--allowed-account",
        action="append",
        default=None,
        metavar="ACCOUNT_ID",
        help="a 12-digit AWS account whose roles pods may have, besides the base ARN's own "
        "account; repeat for several. However permissive a namespace's "
        "iam.amazonaws.com/permitted, roles in other accounts are refused "
        "[env PODIAM_ALLOWED_ACCOUNT, comma-separated]",
    )
    flag(
        "--no-node-binding",
        env="PODIAM_NO_NODE_BINDING",
        action="store_true",
        help="do not require that the agent asking for a pod runs on the pod's node (the "
        "peer address equal to the pod's status.hostIP); weakens isolation",
    )
    flag(
        "--startup-taint",
        env="PODIAM_STARTUP_TAINT",
        default=DEFAULT_STARTUP_TAINT,
        help="taint key that new nodes carry until their agent reports its DNAT rule "
        "installed and its snapshot applied; the server then removes it (any value and "
        "effect; other taints untouched). Needs RBAC nodes get and patch. Empty: disabled",
    )
    flag(
        "--max-connection-age",
        env="PODIAM_MAX_CONNECTION_AGE",
        type=duration,
        default="10m",
        help="agents reconnect after this long, so they spread across server replicas",
    )
    flag(
        "--max-connection-age-grace",
        env="PODIAM_MAX_CONNECTION_AGE_GRACE",
        type=duration,
        default="30s",
        help="after --max-connection-age, calls still open on the old connection (an agent's "
        "node stream, until the agent has moved it to a new one) are cut after this long",
    )
    flag(
        "--node-stream-linger",
        env="PODIAM_NODE_STREAM_LINGER",
        type=duration,
        default=DEFAULT_NODE_STREAM_LINGER,
        help="the shortest time between two messages on one node stream that only add "
        "answers: a change after a quiet spell goes to the agent at once, the new pods and "
        "credentials that follow it within this time go together in one message (each message "
        "costs the server far more than a change; 0 sends every change as it is applied). What "
        "takes an answer away (a pod gone, its IP reused, a pod now denied or ambiguous, "
        "credentials withdrawn) is never held back, and takes what waits with it. Agents wait "
        "up to their --pod-wait for a pod they do not know yet, so keep it well below that",
    )
    flag(
        "--session-tags",
        env="PODIAM_SESSION_TAGS",
        action="store_true",
        help="tag STS sessions (for ABAC) with kubernetes-namespace, kubernetes-service-account, "
        "kubernetes-workload, kubernetes-pod-name and kubernetes-pod-uid (only with "
        "--session-name-from pod) and kubernetes-cluster (with --cluster-name). Roles' trust "
        "policies must allow sts:TagSession",
    )
    flag(
        "--transitive-session-tags",
        env="PODIAM_TRANSITIVE_SESSION_TAGS",
        action="store_true",
        help="mark the session tags transitive, so they survive role chaining",
    )
    flag(
        "--cluster-name",
        env="PODIAM_CLUSTER_NAME",
        default="",
        help="the cluster's name, as the kubernetes-cluster session tag (with --session-tags)",
    )
    flag(
        "--sts-qps",
        env="PODIAM_STS_QPS",
        type=_positive(float),
        default=DEFAULT_QPS,
        help="AssumeRole calls per second this server process may make, on average (STS "
        "limits calls per account, for all callers together); pods waiting for first "
        "credentials go before refreshes",
    )
    flag(
        "--sts-burst",
        env="PODIAM_STS_BURST",
        type=_positive(int),
        default=DEFAULT_BURST,
        help="AssumeRole calls that may be made at once after a quiet spell, above --sts-qps",
    )
    flag(
        "--audit-log",
        env="PODIAM_AUDIT_LOG",
        default="-",
        help="where the audit trail goes: '-' with the other log lines, or a file (JSON lines, "
        "appended, reopened after rotation). One record per credential set obtained (role, "
        "session name, tags, AccessKeyId, expiration; never secrets) and one per pod first "
        "served an identity (namespace, pod, uid, node, AccessKeyId)",
    )
    _token_flags(parser)
    parser.add_process_flags()
    return parser


def _token_flags(parser: EnvDefaultsParser) -> None:
    flag = parser.add_flag
    flag(
        "--token-credentials",
        env="PODIAM_TOKEN_CREDENTIALS",
        action="store_true",
        help="serve token-bound credentials: agents pass a pod's projected service-account "
        "token, which the server checks with a TokenReview (needs RBAC tokenreviews: create); "
        "the pod it names must be active, on the agent's node and permitted its role",
    )
    flag(
        "--token-audience",
        env="PODIAM_TOKEN_AUDIENCE",
        default="podiam",
        help="the audience token-bound credentials' tokens must be issued for",
    )
    flag(
        "--webhook-bind",
        env="PODIAM_WEBHOOK_BIND",
        type=_optional_host_port,
        default="",
        help="address of the mutating admission webhook (HTTPS) that gives pods with an "
        "iam.amazonaws.com/role annotation a podiam token and the container-credentials "
        "environment variables; empty: no webhook",
    )
    flag(
        "--webhook-cert",
        env="PODIAM_WEBHOOK_CERT",
        type=_optional_path,
        default="",
        help="PEM certificate the webhook serves (reloaded when it changes); default: --cert",
    )
    flag(
        "--webhook-key",
        env="PODIAM_WEBHOOK_KEY",
        type=_optional_path,
        default="",
        help="PEM private key of --webhook-cert; default: --key",
    )
    flag(
        "--webhook-endpoint",
        env="PODIAM_WEBHOOK_ENDPOINT",
        default="http://169.254.170.23/v1/credentials",
        help="the AWS_CONTAINER_CREDENTIALS_FULL_URI the webhook injects: the agents' "
        "token-bound endpoint (SDKs accept http:// only for loopback, 169.254.170.2, "
        "169.254.170.23 and fd00:ec2::23)",
    )
    flag(
        "--webhook-token-expiration",
        env="PODIAM_WEBHOOK_TOKEN_EXPIRATION",
        type=duration,
        default="10m",
        help="lifetime of the projected tokens the webhook asks for (at least 10m, the API "
        "server's minimum; the kubelet renews them at 80%% of it)",
    )


def _optional_host_port(raw: str) -> tuple[str, int] | None:
    return host_port(raw) if raw.strip() else None


def _optional_path(raw: str) -> Path | None:
    return Path(raw.strip()) if raw.strip() else None


def _positive(kind: type) -> Callable[[str], float]:
    def convert(raw: str):
        try:
            value = kind(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{raw!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{raw!r} must be greater than 0")
        return value

    convert.__name__ = kind.__name__
    return convert


def _session_name_from(raw: str) -> SessionNameFrom:
    try:
        return SessionNameFrom(raw.strip())
    except ValueError:
        choices = ", ".join(source.value for source in SessionNameFrom)
        raise argparse.ArgumentTypeError(f"{raw!r} is not one of {choices}") from None


def _env_switch(parser: EnvDefaultsParser, env: str) -> bool:
    raw = parser._environ.get(env)
    return parser._switch_from_env(env, raw) if raw is not None else False


def _allowed_accounts(parser: EnvDefaultsParser, flags: list[str] | None) -> frozenset[str]:
    # Flags win over the variable, as for every other flag (argparse's "append" would add to it).
    if flags is None:
        raw = parser._environ.get("PODIAM_ALLOWED_ACCOUNT", "")
        source, values = "PODIAM_ALLOWED_ACCOUNT", [v for v in raw.split(",") if v.strip()]
    else:
        source, values = "--allowed-account", flags
    accounts = set()
    for value in values:
        account = value.strip()
        if not ACCOUNT.fullmatch(account):
            parser.error(f"{source} {value!r} is not a 12-digit AWS account id")
        accounts.add(account)
    return frozenset(accounts)


def parse_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> ServerConfig:
    """Parse and validate; invalid input exits through argparse with one clear message."""
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    return _validate(parser, args)


def _validate(parser: EnvDefaultsParser, args: argparse.Namespace) -> ServerConfig:
    if args.role_base_arn and args.role_base_arn_autodetect:
        parser.error("--role-base-arn and --role-base-arn-autodetect exclude each other")
    if not args.role_base_arn and not args.role_base_arn_autodetect:
        parser.error("one of --role-base-arn or --role-base-arn-autodetect is required")
    base_arn = None
    if args.role_base_arn:
        try:
            base_arn = normalise_base_arn(args.role_base_arn)
        except ArnError as error:
            parser.error(f"--role-base-arn: {error}")
    if args.assume_role_arn and not is_role_arn(args.assume_role_arn):
        parser.error(f"--assume-role-arn {args.assume_role_arn!r} is not an IAM role ARN")
    allowed_accounts = _allowed_accounts(parser, args.allowed_account)
    if not STS_MIN_DURATION <= args.session_duration <= STS_MAX_DURATION:
        parser.error("--session-duration must lie between 15m and 12h (STS limits)")
    if args.session_refresh < MIN_REMAINING:
        parser.error(
            "--session-refresh must be at least 30m: credentials with less time left make "
            "SDKs refresh on every call"
        )
    if args.session_refresh >= args.session_duration:
        parser.error("--session-refresh must be shorter than --session-duration")
    startup_taint = args.startup_taint.strip() or None
    if startup_taint is not None and not is_taint_key(startup_taint):
        parser.error(
            f"--startup-taint {startup_taint!r} is not a taint key (an optional DNS subdomain "
            "prefix and '/', then a name of up to 63 letters, digits, '-', '_' or '.')"
        )
    if not timedelta(0) <= args.node_stream_linger <= MAX_NODE_STREAM_LINGER:
        parser.error("--node-stream-linger must lie between 0 and 500ms")
    if args.transitive_session_tags and not args.session_tags:
        parser.error("--transitive-session-tags needs --session-tags")
    cluster_name = args.cluster_name.strip()
    if len(cluster_name) > 256 or sanitised_tag_value(cluster_name) != cluster_name:
        parser.error(
            f"--cluster-name {cluster_name!r} is not a valid session tag value (up to 256 "
            "letters, digits, spaces and _ . : / = + - @)"
        )
    if not args.session_name.strip():
        parser.error("--session-name must not be empty")
    if not args.token_audience.strip():
        parser.error("--token-audience must not be empty")
    if args.webhook_token_expiration < timedelta(minutes=10) or (
        args.webhook_token_expiration > timedelta(hours=24)
    ):
        parser.error("--webhook-token-expiration must lie between 10m and 24h")
    if not args.webhook_endpoint.startswith(("http://", "https://")):
        parser.error("--webhook-endpoint must be an http:// or https:// URL")
    return ServerConfig(
        bind=args.bind,
        cert=args.cert,
        key=args.key,
        ca=args.ca,
        kubeconfig=args.kubeconfig,
        role_base_arn=base_arn,
        role_base_arn_autodetect=args.role_base_arn_autodetect,
        metadata_endpoint=args.metadata_endpoint,
        region=args.region,
        sts_endpoint=args.sts_endpoint,
        session_duration=args.session_duration,
        session_refresh=args.session_refresh,
        session_name=args.session_name.strip(),
        session_name_from=args.session_name_from,
        assume_role_arn=args.assume_role_arn,
        allowed_accounts=allowed_accounts,
        node_binding=not args.no_node_binding,
        startup_taint=startup_taint,
        prometheus_listen_addr=args.prometheus_listen_addr,
        max_connection_age=args.max_connection_age,
        max_connection_age_grace=args.max_connection_age_grace,
        node_stream_linger=args.node_stream_linger,
        audit_log=args.audit_log.strip() or "-",
        session_tags=args.session_tags,
        transitive_session_tags=args.transitive_session_tags,
        cluster_name=args.cluster_name.strip(),
        sts_qps=args.sts_qps,
        sts_burst=args.sts_burst,
        token_credentials=args.token_credentials,
        token_audience=args.token_audience.strip(),
        webhook_bind=args.webhook_bind,
        webhook_cert=args.webhook_cert,
        webhook_key=args.webhook_key,
        webhook_endpoint=args.webhook_endpoint.strip(),
        webhook_token_expiration=args.webhook_token_expiration,
        log_level=args.log_level,
        json_log=args.json_log,
    )
