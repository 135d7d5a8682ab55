"""Make the mutual-TLS material podiam needs: a CA, a server certificate, an agent certificate.

Clusters with cert-manager or a corporate PKI do not need this module: any CA works as long as
the server certificate carries serverAuth and the Service name as a SAN, and the agent
certificate carries clientAuth. This is for everyone else, and for tests: one call, sensible
key usages, files written so that a pod watching them never reads half a file.

The CA key is not part of the bundle and is never written: rotation means generating a new
bundle and rolling it out to server and agents together (the server reloads it, see
``certs.tls``). Callers who keep their own CA pass it in with ``ca=``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs.tls import (
    AGENT_CERT_FILE,
    AGENT_KEY_FILE,
    CA_FILE,
    SERVER_CERT_FILE,
    SERVER_KEY_FILE,
    key_matches,
)

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

DEFAULT_SERVER_NAMES = ("podiam-server", "localhost", "127.0.0.1")
AGENT_COMMON_NAME = "podiam-agent"
CA_COMMON_NAME = "podiam CA"
# Certificates start this far in the past, so a node whose clock is a little behind accepts them.
CLOCK_SKEW = dt.timedelta(minutes=5)


class KeyType(Enum):
    """The key algorithm of every certificate in a bundle. ECDSA P-256 is small and fast."""

    ECDSA_P256 = "ecdsa-p256"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    RSA_4096 = "rsa-4096"

    def generate(self) -> PrivateKey:
        if self is KeyType.ECDSA_P256:
            return ec.generate_private_key(ec.SECP256R1())
        bits = int(self.value.removeprefix("rsa-"))
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)


@dataclass(frozen=True)
class Bundle:
    """PEM bytes of a CA certificate and of a server and an agent certificate with their keys."""

    ca_pem: bytes
    server_pem: bytes
    server_key_pem: bytes
    agent_pem: bytes
    agent_key_pem: bytes

    def files(self) -> dict[str, bytes]:
        """File name → contents, as written by ``write_bundle``."""
        return {
            CA_FILE: self.ca_pem,
            SERVER_KEY_FILE: self.server_key_pem,
            SERVER_CERT_FILE: self.server_pem,
            AGENT_KEY_FILE: self.agent_key_pem,
            AGENT_CERT_FILE: self.agent_pem,
        }


_KEY_FILES = frozenset({SERVER_KEY_FILE, AGENT_KEY_FILE})


def generate_ca(
    *,
    days: int = 365,
    key_type: KeyType = KeyType.ECDSA_P256,
    common_name: str = CA_COMMON_NAME,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """A self-signed CA that can sign leaf certificates only (path length 0).

    ``not_before``/``not_after`` override the validity window (tests use them to make expired
    certificates); by default it starts ``CLOCK_SKEW`` ago and lasts ``days``.
    """
    start, end = _validity(days, not_before, not_after)
    key = key_type.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        _base(name, name, key.public_key(), start, end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(digital_signature=False, key_cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False)
    )
    return builder.sign(key, hashes.SHA256()), key


def generate_bundle(
    *,
    server_names: Sequence[str] = DEFAULT_SERVER_NAMES,
    days: int = 365,
    key_type: KeyType = KeyType.ECDSA_P256,
    ca: tuple[x509.Certificate, PrivateKey] | None = None,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Bundle:
    """A server and an agent certificate, signed by ``ca`` or by a new CA.

    ``server_names`` become the server's SANs: IP addresses as IP SANs, anything else as DNS
    SANs; the first is also its common name. The agent's common name is ``podiam-agent``.
    ``not_before``/``not_after`` override the validity window of every certificate made here
    (for tests); otherwise they start ``CLOCK_SKEW`` ago and last ``days``.
    """
    sans = _subject_alt_names(server_names)
    start, end = _validity(days, not_before, not_after)
    if ca is None:
        ca_cert, ca_key = generate_ca(
            key_type=key_type, days=days, not_before=not_before, not_after=not_after
        )
    else:
        ca_cert, ca_key = ca
        _check_ca(ca_cert, ca_key, end)

    server_key = key_type.generate()
    server = (
        _leaf(ca_cert, server_names[0], server_key, start, end)
        .add_extension(
            _key_usage(key_encipherment=isinstance(server_key, rsa.RSAPrivateKey)), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    agent_key = key_type.generate()
    agent = (
        _leaf(ca_cert, AGENT_COMMON_NAME, agent_key, start, end)
        .add_extension(_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return Bundle(
        ca_pem=_cert_pem(ca_cert),
        server_pem=_cert_pem(server),
        server_key_pem=_key_pem(server_key),
        agent_pem=_cert_pem(agent),
        agent_key_pem=_key_pem(agent_key),
    )


def write_bundle(bundle: Bundle, out_dir: Path, *, force: bool = False) -> list[Path]:
    """Write the bundle's five files into ``out_dir`` (created if missing); return their paths.

    Without ``force`` nothing is written if any of the files exists (FileExistsError naming it).
    Each file is written to a temporary file in the same directory and renamed into place, so a
    reader sees the old file or the new one, never a part. Keys are created mode 0600.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    contents = bundle.files()
    if not force:
        for name in contents:
            path = out_dir / name
            if path.exists() or path.is_symlink():
                raise FileExistsError(f"{path} already exists; refusing to overwrite it")
    written = []
    for name, data in contents.items():
        mode = 0o600 if name in _KEY_FILES else 0o644
        path = out_dir / name
        _write_atomically(path, data, mode)
        written.append(path)
    return written


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            # Created with its final mode: a key is never readable by others, not even briefly.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            continue
        break
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _validity(
    days: int, not_before: dt.datetime | None, not_after: dt.datetime | None
) -> tuple[dt.datetime, dt.datetime]:
    if days < 1:
        raise ValueError(f"days must be at least 1, not {days}")
    now = dt.datetime.now(dt.UTC)
    start = not_before or now - CLOCK_SKEW
    end = not_after or now + dt.timedelta(days=days)
    if end <= start:
        raise ValueError(f"not_after ({end}) must be later than not_before ({start})")
    return start, end


def _subject_alt_names(names: Sequence[str]) -> list[x509.GeneralName]:
    if isinstance(names, str):
        raise TypeError("server_names must be a sequence of names, not one string")
    if not names:
        raise ValueError("at least one server name is needed")
    sans: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):  # de-duplicated, order kept
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            continue
        except ValueError:
            pass
        if not name or not name.isascii() or any(c.isspace() or c in "/:@" for c in name):
            raise ValueError(f"server name {name!r} is neither a DNS name nor an IP address")
        sans.append(x509.DNSName(name))
    return sans


def _check_ca(cert: x509.Certificate, key: PrivateKey, leaf_end: dt.datetime) -> None:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise ValueError(f"CA certificate {cert.subject.rfc4514_string()} is not a CA")
    if not key_matches(cert, key):
        raise ValueError("the CA key does not match the CA certificate")
    if cert.not_valid_after_utc < leaf_end:
        raise ValueError(
            f"the CA expires on {cert.not_valid_after_utc:%Y-%m-%d}, before the certificates"
            f" it would sign ({leaf_end:%Y-%m-%d}); use fewer days or a new CA"
        )


def _base(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: PublicKey,
    start: dt.datetime,
    end: dt.datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
    )


def _leaf(
    ca: x509.Certificate,
    common_name: str,
    key: PrivateKey,
    start: dt.datetime,
    end: dt.datetime,
) -> x509.CertificateBuilder:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    try:
        ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key())  # type: ignore[arg-type]
    return (
        _base(subject, ca.subject, key.public_key(), start, end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(aki, critical=False)
    )


def _key_usage(
    *, digital_signature: bool = True, key_encipherment: bool = False, key_cert_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
