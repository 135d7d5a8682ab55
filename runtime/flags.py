"""Command-line flags with environment-variable twins, and the value types they share (used by
both podiam-server and podiam-agent).

Every flag can also be set from its environment variable (the flag wins), which is how the Helm
chart and container platforms usually configure a process. ``--help`` names each twin.

A bad flag or variable is a start-up error like any other: one line on stderr and exit code
``CANNOT_START`` — not argparse's usage block and exit 2 — so that a crash-looping pod's last log
line says what is wrong, and scripts see one code for "cannot start".
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

# The exit code of every start-up error, found in the flags or while starting.
CANNOT_START = 1


def duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``1h``, ``1h30m`` or plain seconds (``900``)."""
    text = text.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return timedelta(seconds=float(text))
    if not text or _DURATION_PART.sub("", text):
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: use forms like 90s, 15m, 1h or 1h30m"
        )
    seconds = sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(text))
    return timedelta(seconds=seconds)


def host_port(text: str) -> tuple[str, int]:
    """``host:port``, ``:port`` (all interfaces) or ``[v6]:port``; port 0 picks a free one."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"invalid address {text!r}: expected host:port")
    return host.strip("[]") or "0.0.0.0", int(port)


def port(text: str) -> int:
    """A TCP port number; 0 picks a free one."""
    if not text.strip().isdigit() or not 0 <= int(text) < 65536:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: expected a number 0-65535")
    return int(text)


def optional_host_port(text: str) -> tuple[str, int] | None:
    """``host:port``, or empty for "disabled"."""
    return host_port(text) if text.strip() else None


def log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise argparse.ArgumentTypeError(
            f"invalid log level {text!r}: use debug, info, warning or error"
        )
    return level


class EnvDefaultsParser(argparse.ArgumentParser):
    """An ArgumentParser whose ``add_flag`` reads a default from an environment variable."""

    def __init__(self, *args, environ: Mapping[str, str] | None = None, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self._environ = os.environ if environ is None else environ

    def error(self, message: str) -> NoReturn:
        """One line, ``<prog>: error: <message>``, and exit ``CANNOT_START``.

        argparse would print the usage block first (and exit 2); ``--help`` still shows it.
        """
        self.exit(CANNOT_START, f"{self.prog}: error: {' '.join(message.split())}\n")

    def add_flag(self, flag: str, *, env: str, help: str, **kwargs) -> argparse.Action:
        raw = self._environ.get(env)
        is_switch = kwargs.get("action") == "store_true"
        if raw is not None:
            if is_switch:
                kwargs["default"] = self._switch_from_env(env, raw)
            else:
                converter = kwargs.get("type")
                try:
                    kwargs["default"] = converter(raw) if converter else raw
                except (argparse.ArgumentTypeError, ValueError) as error:
                    self.error(f"environment variable {env}: {error}")
                kwargs["required"] = False
        return self.add_argument(flag, help=f"{help} [env {env}]", **kwargs)

    def add_tls_flags(self, *, cert_help: str, ca_help: str) -> None:
        """--cert, --key and --ca: this side's certificate and key, and the CA of the peer."""
        self.add_flag("--cert", env="PODIAM_CERT", type=Path, required=True, help=cert_help)
        self.add_flag(
            "--key", env="PODIAM_KEY", type=Path, required=True, help="PEM private key of --cert"
        )
        self.add_flag("--ca", env="PODIAM_CA", type=Path, required=True, help=ca_help)

    def add_process_flags(self) -> None:
        """Metrics address and logging, the same for server and agent."""
        self.add_flag(
            "--prometheus-listen-addr",
            env="PODIAM_PROMETHEUS_LISTEN_ADDR",
            type=optional_host_port,
            default="0.0.0.0:9620",
            help="address of the Prometheus /metrics endpoint; empty disables it",
        )
        self.add_flag(
            "--log-level",
            env="PODIAM_LOG_LEVEL",
            type=log_level,
            default="info",
            help="debug, info, warning or error",
        )
        self.add_flag(
            "--json-log", env="PODIAM_JSON_LOG", action="store_true",
            help="log one JSON object per line",
        )  # fmt: skip

    def _switch_from_env(self, env: str, raw: str) -> bool:
        value = raw.strip().lower()
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        self.error(f"environment variable {env}: expected true or false, got {raw!r}")
        raise AssertionError("unreachable")
