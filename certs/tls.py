"""Load the mutual-TLS material and turn it into gRPC credentials, for both agent and server.

gRPC itself accepts any bytes and only complains at the first handshake, with an error that
names neither the file nor the problem ("handshake failed"). This module reads and checks the
files up front — all parse, the key belongs to the certificate, the certificate is in its
validity window and made for its side (serverAuth for the server, clientAuth for the agent) —
so a misconfigured pod fails at start-up with one line naming the file.

On the server side, ``server_credentials(files, reload=True)`` re-reads the files when they
change (a Kubernetes Secret update, a cert-manager renewal), keeping the previous material
while the new files are missing, half-written or invalid. gRPC asks for it on every new
connection; connections already open keep the certificate they were made with.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa, types
from cryptography.x509.oid import ExtendedKeyUsageOID

log = logging.getLogger(__name__)

# The file names written by ``podiam-certs generate`` and expected by ``podiam-certs check``.
CA_FILE = "ca.pem"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server-key.pem"
AGENT_CERT_FILE = "agent.pem"
AGENT_KEY_FILE = "agent-key.pem"


class TlsConfigError(Exception):
    """The TLS files cannot be used; the message is one line that names the file."""


class Purpose(enum.Enum):
    """Which side of the mutual-TLS connection a certificate is presented by."""

    SERVER = "serverAuth"
    CLIENT = "clientAuth"

    @property
    def oid(self) -> x509.ObjectIdentifier:
        return _PURPOSE_OIDS[self]


_PURPOSE_OIDS = {
    Purpose.SERVER: ExtendedKeyUsageOID.SERVER_AUTH,
    Purpose.CLIENT: ExtendedKeyUsageOID.CLIENT_AUTH,
}
_EKU_NAMES = {oid: purpose.value for purpose, oid in _PURPOSE_OIDS.items()}


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Where one side's TLS material lives: its own certificate and key, and the CA it trusts."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def server_in(cls, directory: Path) -> TlsFiles:
        """The server's files in a directory written by ``podiam-certs generate``."""
        directory = Path(directory)
        return cls(
            cert=directory / SERVER_CERT_FILE,
            key=directory / SERVER_KEY_FILE,
            ca=directory / CA_FILE,
        )

    @classmethod
    def agent_in(cls, directory: Path) -> TlsFiles:
        """The agent's files in a directory written by ``podiam-certs generate``."""
        directory = Path(directory)
        return cls(
            cert=directory / AGENT_CERT_FILE,
            key=directory / AGENT_KEY_FILE,
            ca=directory / CA_FILE,
        )


def read_file(path: Path, what: str) -> bytes:
    """The bytes of ``path``, or a TlsConfigError saying ``<what> <path>: <problem>``."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise TlsConfigError(f"{what} {path}: no such file") from None
    except PermissionError:
        raise TlsConfigError(f"{what} {path}: permission denied") from None
    except IsADirectoryError:
        raise TlsConfigError(f"{what} {path}: is a directory, not a file") from None
    except OSError as exc:
        raise TlsConfigError(f"{what} {path}: cannot read: {exc.strerror}") from None


def parse_certificates(data: bytes, path: Path, what: str) -> list[x509.Certificate]:
    """All PEM certificates in ``data`` (a leaf and its chain, or a CA bundle), at least one."""
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TlsConfigError(f"{what} {path}: not a PEM certificate") from None


def parse_private_key(data: bytes, path: Path) -> types.PrivateKeyTypes:
    """The unencrypted PEM private key in ``data``."""
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        # Raised by cryptography when the key is encrypted and no password was given.
        raise TlsConfigError(f"key {path}: is encrypted; podiam needs an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise TlsConfigError(f"key {path}: not a PEM private key") from None


def public_key_bytes(key: types.PublicKeyTypes) -> bytes:
    """A canonical encoding of a public key, to compare a key with a certificate."""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_matches(cert: x509.Certificate, key: types.PrivateKeyTypes) -> bool:
    return public_key_bytes(cert.public_key()) == public_key_bytes(key.public_key())


def check_validity(
    cert: x509.Certificate, path: Path, what: str, *, now: dt.datetime | None = None
) -> None:
    """Raise if ``cert`` is expired or not yet valid at ``now`` (default: the current time)."""
    now = now or dt.datetime.now(dt.UTC)
    if cert.not_valid_after_utc <= now:
        raise TlsConfigError(f"{what} {path}: expired on {_when(cert.not_valid_after_utc)}")
    if cert.not_valid_before_utc > now:
        raise TlsConfigError(f"{what} {path}: not valid until {_when(cert.not_valid_before_utc)}")


def check_purpose(cert: x509.Certificate, path: Path, purpose: Purpose) -> None:
    """Raise unless ``cert`` may be presented by the ``purpose`` side of a TLS connection.

    As in RFC 5280 (and OpenSSL and BoringSSL, which gRPC uses): without an extended key usage
    extension a certificate is good for any purpose; with one, it must list ``purpose`` (or
    anyExtendedKeyUsage). A key usage extension, when present, must allow the signature the
    handshake needs (for an RSA server key, key encipherment will do too). Otherwise the peer
    refuses the handshake with an error that names neither the file nor the usage.
    """
    try:
        ekus = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        ekus = None
    allowed = {purpose.oid, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE}
    if ekus is not None and not allowed.intersection(ekus):
        listed = ", ".join(_EKU_NAMES.get(oid, oid.dotted_string) for oid in ekus) or "nothing"
        raise TlsConfigError(
            f"certificate {path}: its extended key usage is {listed}, not {purpose.value}; "
            f"a {purpose.name.lower()} certificate needs {purpose.value}"
        )
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    rsa_server = purpose is Purpose.SERVER and isinstance(cert.public_key(), rsa.RSAPublicKey)
    if not usage.digital_signature and not (rsa_server and usage.key_encipherment):
        raise TlsConfigError(
            f"certificate {path}: its key usage lacks digitalSignature, which a "
            f"{purpose.name.lower()} certificate needs to sign the TLS handshake"
        )


def expiry_times(files: TlsFiles, *, side: str) -> dict[str, float]:
    """When the certificate of ``files`` and the latest-expiring CA of its bundle expire, in
    seconds since the epoch, as ``{side: ..., "ca": ...}`` (for the metrics of both programs).
    A file that cannot be read or parsed now is left out: the process keeps what it loaded."""
    found = {}
    for label, path, what in ((side, files.cert, "certificate"), ("ca", files.ca, "CA bundle")):
        try:
            certs = parse_certificates(read_file(path, what), path, what)
        except TlsConfigError:
            continue
        # The leaf comes first in a chain; of a CA bundle, the CA that lasts longest counts.
        chosen = certs[0] if label == side else max(certs, key=lambda c: c.not_valid_after_utc)
        found[label] = chosen.not_valid_after_utc.timestamp()
    return found


def load_tls_material(files: TlsFiles, *, purpose: Purpose) -> tuple[bytes, bytes, bytes]:
    """``(cert, key, ca)`` PEM bytes from ``files``, checked to be usable together by the
    ``purpose`` side of a connection.

    Checked: every file parses; the key is the certificate's; the certificate is made for
    ``purpose`` (see ``check_purpose``); the certificate and (at least one certificate in) the
    CA file are within their validity. Not checked: that the
    certificate was issued by this CA — the CA verifies the *other* side, whose issuer may
    legitimately differ (``podiam-certs check`` verifies a generated directory as a whole).
    """
    cert_pem = read_file(files.cert, "certificate")
    key_pem = read_file(files.key, "key")
    ca_pem = read_file(files.ca, "CA certificate")

    cert = parse_certificates(cert_pem, files.cert, "certificate")[0]
    key = parse_private_key(key_pem, files.key)
    cas = parse_certificates(ca_pem, files.ca, "CA certificate")

    if not key_matches(cert, key):
        raise TlsConfigError(f"key {files.key}: key does not match certificate {files.cert}")
    check_validity(cert, files.cert, "certificate")
    check_purpose(cert, files.cert, purpose)
    # A CA file may hold the old and the new CA during a CA rotation; one valid CA is enough.
    problems = []
    for ca in cas:
        try:
            check_validity(ca, files.ca, "CA certificate")
        except TlsConfigError as exc:
            problems.append(exc)
    if len(problems) == len(cas):
        raise problems[0]
    return cert_pem, key_pem, ca_pem


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """Agent side: trust only ``files.ca`` and present ``files.cert`` as the client certificate."""
    cert_pem, key_pem, ca_pem = load_tls_material(files, purpose=Purpose.CLIENT)
    return grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )


def server_credentials(files: TlsFiles, *, reload: bool = False) -> grpc.ServerCredentials:
    """Server side: present ``files.cert``; require a client certificate issued by ``files.ca``.

    With ``reload=True`` the files are re-read whenever one of them changes (checked at each
    new connection, by inode, size and modification time). Invalid new files are logged once
    and ignored: the server keeps serving with the last good material.
    """
    # Stamped before reading: a change while reading is re-read at the first handshake.
    stamp = files_stamp(files)
    cert_pem, key_pem, ca_pem = load_tls_material(files, purpose=Purpose.SERVER)
    if not reload:
        return grpc.ssl_server_credentials(
            [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=True
        )
    fetcher = _ReloadingFetcher(files, loaded=stamp)
    initial = grpc.ssl_server_certificate_configuration(
        [(key_pem, cert_pem)], root_certificates=ca_pem
    )
    return grpc.dynamic_ssl_server_credentials(initial, fetcher, require_client_authentication=True)


_FileStamp = tuple[int, int, int] | None  # (inode, size, mtime_ns), None when missing
FilesStamp = tuple[_FileStamp, _FileStamp, _FileStamp]


def files_stamp(files: TlsFiles) -> FilesStamp:
    """What identifies the current contents of the three files, cheaply: compare two stamps to
    know whether anything changed (a rotation) without reading the files."""

    def one(path: Path) -> _FileStamp:
        try:
            st = os.stat(path)  # follows symlinks: Kubernetes swaps the ..data link on update
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    return (one(files.cert), one(files.key), one(files.ca))


class _ReloadingFetcher:
    """The certificate-configuration fetcher gRPC calls before each new TLS handshake.

    Returns None ("keep what you have") unless the files changed since the material in use was
    read and the new files are valid. Called from gRPC's own threads, hence the lock.
    """

    def __init__(self, files: TlsFiles, *, loaded: FilesStamp) -> None:
        self._files = files
        self._lock = threading.Lock()
        self._current = loaded  # the files' stamp when the material in use was read
        self._rejected: FilesStamp | None = None

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            return self._fetch()
        except Exception:  # an exception here would fail the handshake; keep serving instead
            log.exception("TLS reload failed unexpectedly; keeping the previous material")
            return None

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        stamp = files_stamp(self._files)
        with self._lock:
            if stamp == self._current or stamp == self._rejected:
                return None
            try:
                cert_pem, key_pem, ca_pem = load_tls_material(self._files, purpose=Purpose.SERVER)
            except TlsConfigError as exc:
                self._rejected = stamp
                log.warning("TLS files changed but are not usable, keeping the previous: %s", exc)
                return None
            self._current, self._rejected = stamp, None
        cert = x509.load_pem_x509_certificate(cert_pem)
        log.info(
            "TLS material reloaded from %s (certificate expires %s)",
            self._files.cert,
            _when(cert.not_valid_after_utc),
        )
        return grpc.ssl_server_certificate_configuration(
            [(key_pem, cert_pem)], root_certificates=ca_pem
        )


def _when(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")
