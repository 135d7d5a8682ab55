"""``podiam-server explain NAMESPACE/POD``: ask the running server why a pod gets credentials or
not, and print its answer step by step.

The server holds the decision's state (its watches, its credentials cache), so the command asks
it, over its own mutual-TLS gRPC port (``ExplainPod``), rather than re-deriving anything from the
Kubernetes API: what it prints is what the server would answer now. The server answers only on
its own host, so the command runs where the server runs — ``kubectl exec`` into the server pod,
whose defaults here match the chart (port 8443, the probe's client certificate in
/etc/podiam/probe) — or through ``kubectl port-forward``.

Exit code 0 when the pod would be served, 2 when it would not, 1 when the server could not be
asked (bad flags, unreadable certificates, server unreachable).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TextIO

import grpc
from google.protobuf.json_format import MessageToDict

from certs.tls import TlsConfigError, TlsFiles, channel_credentials
from protos import kiam_pb2, kiam_pb2_grpc
from runtime.flags import EnvDefaultsParser, duration, host_port

SERVED, NOT_SERVED, CANNOT_ASK = 0, 2, 1
_MARKS = {"pass": "ok", "fail": "NO", "info": "--", "skip": ".."}
_PROBE_TLS = Path("/etc/podiam/probe")


def build_parser(environ: Mapping[str, str] | None = None) -> EnvDefaultsParser:
    parser = EnvDefaultsParser(
        prog="podiam-server explain",
        description=(
            "Print each step of the server's decision for one pod as the running server sees it "
            "now (pod found and active, IP unique, role and ARN, account, namespace pattern, "
            "node binding, identity, cached credentials, last STS error), the answer the pod "
            "gets, and the one change that would make it succeed. Run it in the server pod "
            "(kubectl exec) or through kubectl port-forward: the server answers only callers on "
            "its own host. Exit code 0: the pod is served; 2: it is not; 1: the server could "
            "not be asked."
        ),
        environ=environ,
    )
    parser.add_argument("pod", metavar="NAMESPACE/POD", type=_pod_name, help="the pod to explain")
    flag = parser.add_flag
    flag(
        "--server-address",
        env="PODIAM_EXPLAIN_SERVER_ADDRESS",
        type=host_port,
        default="127.0.0.1:8443",
        help="the server's gRPC address (the chart's port is 8443)",
    )
    flag(
        "--cert",
        env="PODIAM_EXPLAIN_CERT",
        type=Path,
        default=str(_PROBE_TLS / "tls.crt"),
        help="client certificate (clientAuth) the server accepts; the chart mounts the agent's "
        "in the server pod for its probes",
    )
    flag(
        "--key",
        env="PODIAM_EXPLAIN_KEY",
        type=Path,
        default=str(_PROBE_TLS / "tls.key"),
        help="private key of --cert",
    )
    flag(
        "--ca",
        env="PODIAM_EXPLAIN_CA",
        type=Path,
        default=str(_PROBE_TLS / "ca.crt"),
        help="CA bundle the server's certificate chains to",
    )
    flag(
        "--timeout",
        env="PODIAM_EXPLAIN_TIMEOUT",
        type=duration,
        default="5s",
        help="how long to wait for the server",
    )
    flag("--json", env="PODIAM_EXPLAIN_JSON", action="store_true", help="print the answer as JSON")
    return parser


def _pod_name(text: str) -> tuple[str, str]:
    namespace, sep, name = text.strip().partition("/")
    if not sep or not namespace or not name or "/" in name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAMESPACE/POD")
    return namespace, name


def main(
    argv: Sequence[str], environ: Mapping[str, str] | None = None, out: TextIO | None = None
) -> int:
    out = out or sys.stdout
    args = build_parser(environ).parse_args(argv)
    namespace, name = args.pod
    try:
        credentials = channel_credentials(TlsFiles(cert=args.cert, key=args.key, ca=args.ca))
    except TlsConfigError as error:
        print(f"podiam-server explain: {error}", file=sys.stderr)
        return CANNOT_ASK
    host, port = args.server_address
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    with grpc.secure_channel(target, credentials) as channel:
        stub = kiam_pb2_grpc.KiamServiceStub(channel)
        try:
            answer = stub.ExplainPod(
                kiam_pb2.ExplainPodRequest(namespace=namespace, name=name),
                timeout=args.timeout.total_seconds(),
            )
        except grpc.RpcError as error:
            print(
                f"podiam-server explain: the server at {target} answered "
                f"{error.code().name}: {error.details()}",
                file=sys.stderr,
            )
            return CANNOT_ASK
    if args.json:
        json.dump(MessageToDict(answer, always_print_fields_with_no_presence=True), out, indent=2)
        out.write("\n")
    else:
        out.write(render(namespace, name, answer))
    return SERVED if answer.served else NOT_SERVED


def render(namespace: str, name: str, answer: kiam_pb2.PodExplanation) -> str:
    width = max((len(step.check) for step in answer.steps), default=0)
    lines = [f"pod {namespace}/{name}, as the server sees it now:"]
    for step in answer.steps:
        detail = f"  {step.detail}" if step.detail else ""
        line = f"  {_MARKS.get(step.outcome, '??')}  {step.check:<{width}}{detail}"
        lines.append(line.rstrip())
    lines.append(f"answer: {answer.answer}")
    if answer.fix:
        lines.append(f"fix:    {answer.fix}")
    return "\n".join(lines) + "\n"
