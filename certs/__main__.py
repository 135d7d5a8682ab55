"""``podiam-certs``: generate and check the mutual-TLS material for podiam's agent and server."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NoReturn

from certs.authority import DEFAULT_SERVER_NAMES, KeyType, generate_bundle, write_bundle
from certs.check import check_dir

PROG = "podiam-certs"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}: {text!r}")
        return value

    return parse


def _truthy(text: str | None) -> bool:
    return (text or "").strip().lower() in {"1", "true", "yes", "on"}


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; each flag's default comes from its environment variable twin."""
    env = os.environ if environ is None else environ
    parser = _Parser(
        prog=PROG,
        description="Generate and check the mutual-TLS material of the podiam agent and server.",
        epilog="Every flag has an environment twin, shown in its help; the flag wins.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = commands.add_parser(
        "generate",
        help="write a new CA, server certificate and agent certificate",
        description=(
            "Write ca.pem, server.pem, server-key.pem, agent.pem and agent-key.pem into DIR."
            " The CA key is not kept: to rotate, generate a new set and roll it out to the"
            " server and the agents together (the server reloads its files)."
        ),
    )
    server_names = env.get("PODIAM_CERTS_SERVER_NAMES", "")
    gen.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        default=env.get("PODIAM_CERTS_OUT"),
        required="PODIAM_CERTS_OUT" not in env,
        help="directory to write into, created if missing [env PODIAM_CERTS_OUT]",
    )
    gen.add_argument(
        "--server-name",
        metavar="NAME",
        dest="server_names",
        action="append",
        help=(
            "a name agents use to reach the server, e.g. the Service's DNS name"
            " podiam-server.kube-system.svc; repeat for several; IP addresses become IP SANs."
            f" Replaces the default {', '.join(DEFAULT_SERVER_NAMES)}"
            " [env PODIAM_CERTS_SERVER_NAMES, comma-separated]"
        ),
    )
    gen.set_defaults(
        server_names_default=[n.strip() for n in server_names.split(",") if n.strip()]
        or list(DEFAULT_SERVER_NAMES)
    )
    gen.add_argument(
        "--days",
        type=_int_at_least(1),
        default=env.get("PODIAM_CERTS_DAYS", "365"),
        help="validity of every certificate, in days (default 365) [env PODIAM_CERTS_DAYS]",
    )
    gen.add_argument(
        "--key-type",
        choices=[k.value for k in KeyType],
        default=env.get("PODIAM_CERTS_KEY_TYPE", KeyType.ECDSA_P256.value),
        help="key algorithm (default ecdsa-p256) [env PODIAM_CERTS_KEY_TYPE]",
    )
    gen.add_argument(
        "--force",
        action="store_true",
        default=_truthy(env.get("PODIAM_CERTS_FORCE")),
        help="overwrite existing files instead of refusing [env PODIAM_CERTS_FORCE=1]",
    )
    gen.set_defaults(run=_generate)

    check = commands.add_parser(
        "check",
        help="inspect a directory of certificates and fail on anything wrong",
        description=(
            "Print subject, issuer, SANs, EKUs and expiry of ca.pem, server.pem and agent.pem;"
            " verify that the server and agent certificates are signed by ca.pem, carry"
            " serverAuth / clientAuth, and match their keys. Exit 1 if anything is wrong or a"
            " certificate expires within --warn-days."
        ),
    )
    check.add_argument(
        "dir",
        metavar="DIR",
        type=Path,
        nargs=None if "PODIAM_CERTS_DIR" not in env else "?",
        default=env.get("PODIAM_CERTS_DIR"),
        help="directory written by 'generate' [env PODIAM_CERTS_DIR]",
    )
    check.add_argument(
        "--warn-days",
        type=_int_at_least(0),
        default=env.get("PODIAM_CERTS_WARN_DAYS", "30"),
        help="fail if a certificate expires within this many days (default 30)"
        " [env PODIAM_CERTS_WARN_DAYS]",
    )
    check.set_defaults(run=_check)
    return parser


def _generate(args: argparse.Namespace) -> int:
    names = args.server_names or args.server_names_default
    try:
        bundle = generate_bundle(
            server_names=names, days=args.days, key_type=KeyType(args.key_type)
        )
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    try:
        written = write_bundle(bundle, args.out, force=args.force)
    except FileExistsError as exc:
        print(f"{PROG}: {exc} (use --force to overwrite)", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{PROG}: cannot write {exc.filename or args.out}: {exc.strerror}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


def _check(args: argparse.Namespace) -> int:
    report = check_dir(args.dir, warn_days=args.warn_days)
    for line in report.lines:
        print(line)
    for problem in report.problems:
        print(f"{PROG}: {problem}", file=sys.stderr)
    if report.ok:
        print(f"ok: {args.dir}")
        return 0
    return 1


def main(argv: Sequence[str] | None = None, *, environ: Mapping[str, str] | None = None) -> int:
    """Run ``podiam-certs`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser(environ)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
