"""Inspect a directory of podiam TLS material before it is rolled out (``podiam-certs check``).

A bad certificate shows up in gRPC as "handshake failed" on one side and nothing useful on the
other. This check says, per file, what is wrong: expired or expiring soon, not signed by
``ca.pem``, a key that belongs to another certificate, a missing key usage or SAN.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID

from certs.tls import (
    AGENT_CERT_FILE,
    AGENT_KEY_FILE,
    CA_FILE,
    SERVER_CERT_FILE,
    SERVER_KEY_FILE,
    TlsConfigError,
    key_matches,
    parse_certificates,
    parse_private_key,
    read_file,
)

_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
}


@dataclass
class CheckReport:
    """What ``check_dir`` found: a description of each certificate, and the problems."""

    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_dir(
    directory: Path, *, warn_days: int = 30, now: dt.datetime | None = None
) -> CheckReport:
    """Check ``ca.pem``, ``server.pem``/``server-key.pem`` and ``agent.pem``/``agent-key.pem``.

    A certificate that expires within ``warn_days`` counts as a problem, so that a scheduled
    check fails while there is still time to rotate.
    """
    directory = Path(directory)
    now = now or dt.datetime.now(dt.UTC)
    report = CheckReport()

    ca = _load_cert(directory / CA_FILE, "CA certificate", report)
    if ca is not None:
        _describe(directory / CA_FILE, ca, report, now=now, warn_days=warn_days)
        if not _is_ca(ca):
            report.problems.append(f"{directory / CA_FILE}: not a CA certificate")

    leaves = (
        (SERVER_CERT_FILE, SERVER_KEY_FILE, ExtendedKeyUsageOID.SERVER_AUTH),
        (AGENT_CERT_FILE, AGENT_KEY_FILE, ExtendedKeyUsageOID.CLIENT_AUTH),
    )
    for cert_name, key_name, eku in leaves:
        cert_path, key_path = directory / cert_name, directory / key_name
        cert = _load_cert(cert_path, "certificate", report)
        if cert is None:
            continue
        _describe(cert_path, cert, report, now=now, warn_days=warn_days)
        if ca is not None and not _issued_by(cert, ca):
            report.problems.append(f"{cert_path}: not signed by {directory / CA_FILE}")
        if eku not in _ekus(cert):
            report.problems.append(f"{cert_path}: no {_EKU_NAMES[eku]} extended key usage")
        if cert_name == SERVER_CERT_FILE and not _sans(cert):
            report.problems.append(f"{cert_path}: no subject alternative names")
        try:
            key = parse_private_key(read_file(key_path, "key"), key_path)
        except TlsConfigError as exc:
            report.problems.append(str(exc))
            continue
        if not key_matches(cert, key):
            report.problems.append(f"{key_path}: key does not match certificate {cert_path}")
    return report


def _load_cert(path: Path, what: str, report: CheckReport) -> x509.Certificate | None:
    try:
        return parse_certificates(read_file(path, what), path, what)[0]
    except TlsConfigError as exc:
        report.problems.append(str(exc))
        return None


def _describe(
    path: Path, cert: x509.Certificate, report: CheckReport, *, now: dt.datetime, warn_days: int
) -> None:
    end = cert.not_valid_after_utc
    days_left = (end - now) // dt.timedelta(days=1)
    parts = [f"subject {cert.subject.rfc4514_string()}", f"issuer {cert.issuer.rfc4514_string()}"]
    if sans := _sans(cert):
        parts.append("SANs " + ", ".join(sans))
    if ekus := _ekus(cert):
        parts.append("EKU " + ", ".join(_EKU_NAMES.get(o, o.dotted_string) for o in ekus))
    parts.append(f"expires {end:%Y-%m-%d %H:%M:%S} UTC ({days_left} days)")
    report.lines.append(f"{path.name}: " + "; ".join(parts))

    if end <= now:
        report.problems.append(f"{path}: expired on {end:%Y-%m-%d %H:%M:%S} UTC")
    elif cert.not_valid_before_utc > now:
        start = cert.not_valid_before_utc
        report.problems.append(f"{path}: not valid until {start:%Y-%m-%d %H:%M:%S} UTC")
    elif end - now < dt.timedelta(days=warn_days):
        report.problems.append(
            f"{path}: expires in {days_left} days, on {end:%Y-%m-%d}"
            f" (within --warn-days {warn_days})"
        )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _ekus(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return []


def _sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [f"DNS:{n}" for n in san.get_values_for_type(x509.DNSName)] + [
        f"IP:{ip}" for ip in san.get_values_for_type(x509.IPAddress)
    ]
