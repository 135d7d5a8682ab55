"""The mutual-TLS material: what podiam-certs generates, how it is checked and loaded, and that
real gRPC connections between agent and server accept exactly the right certificates."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import logging
import os
import re
import shlex
import shutil
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs.__main__ import main
from certs.authority import (
    Bundle,
    KeyType,
    generate_bundle,
    generate_ca,
    write_bundle,
)
from certs.tls import (
    Purpose,
    TlsConfigError,
    TlsFiles,
    channel_credentials,
    load_tls_material,
    server_credentials,
)
from protos import kiam_pb2, kiam_pb2_grpc

if TYPE_CHECKING:
    from tests.support.tls import TlsDirs

pytest_plugins = ["tests.support.tls"]

FILES = ("ca.pem", "server.pem", "server-key.pem", "agent.pem", "agent-key.pem")


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return generate_bundle()


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _ext(cert: x509.Certificate, kind: type) -> x509.ExtensionType:
    return cert.extensions.get_extension_for_class(kind).value


def _write_dir(path: Path, **kwargs: object) -> Path:
    write_bundle(generate_bundle(**kwargs), path)  # type: ignore[arg-type]
    return path


# --- what is generated -------------------------------------------------------------------------


def test_ca_can_only_sign_leaf_certificates(bundle: Bundle) -> None:
    ca = _cert(bundle.ca_pem)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = _ext(ca, x509.KeyUsage)
    assert usage.key_cert_sign and usage.crl_sign
    assert ca.subject == ca.issuer


def test_server_certificate_is_for_server_auth_with_dns_and_ip_sans(bundle: Bundle) -> None:
    server, ca = _cert(bundle.server_pem), _cert(bundle.ca_pem)
    server.verify_directly_issued_by(ca)
    assert list(_ext(server, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.SERVER_AUTH]
    sans = _ext(server, x509.SubjectAlternativeName)
    assert sans.get_values_for_type(x509.DNSName) == ["podiam-server", "localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    usage = _ext(server, x509.KeyUsage)
    assert usage.digital_signature and not usage.key_encipherment and not usage.key_cert_sign
    assert not _ext(server, x509.BasicConstraints).ca


def test_rsa_server_certificate_also_allows_key_encipherment() -> None:
    bundle = generate_bundle(key_type=KeyType.RSA_2048, server_names=["podiam.example", "::1"])
    server = _cert(bundle.server_pem)
    assert server.public_key().key_size == 2048
    usage = _ext(server, x509.KeyUsage)
    assert usage.digital_signature and usage.key_encipherment
    sans = _ext(server, x509.SubjectAlternativeName)
    assert sans.get_values_for_type(x509.DNSName) == ["podiam.example"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("::1")]


def test_agent_certificate_is_a_client_certificate_named_podiam_agent(bundle: Bundle) -> None:
    agent, ca = _cert(bundle.agent_pem), _cert(bundle.ca_pem)
    agent.verify_directly_issued_by(ca)
    assert agent.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "podiam-agent"
    assert list(_ext(agent, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    usage = _ext(agent, x509.KeyUsage)
    assert usage.digital_signature and not usage.key_cert_sign


def test_certificates_start_minutes_ago_and_last_the_requested_days() -> None:
    now = dt.datetime.now(dt.UTC)
    bundle = generate_bundle(days=30)
    serials = set()
    for pem in (bundle.ca_pem, bundle.server_pem, bundle.agent_pem):
        cert = _cert(pem)
        assert now - dt.timedelta(minutes=10) < cert.not_valid_before_utc < now
        assert abs(cert.not_valid_after_utc - (now + dt.timedelta(days=30))) < dt.timedelta(
            minutes=1
        )
        serials.add(cert.serial_number)
    assert len(serials) == 3


def test_bundle_can_be_signed_by_an_existing_ca() -> None:
    ca_cert, ca_key = generate_ca(days=100)
    bundle = generate_bundle(ca=(ca_cert, ca_key), days=10)
    assert _cert(bundle.ca_pem) == ca_cert
    _cert(bundle.server_pem).verify_directly_issued_by(ca_cert)
    _cert(bundle.agent_pem).verify_directly_issued_by(ca_cert)
    with pytest.raises(ValueError, match="CA expires"):
        generate_bundle(ca=(ca_cert, ca_key), days=365)


def test_server_names_that_are_not_names_are_refused() -> None:
    with pytest.raises(ValueError, match="neither a DNS name nor an IP"):
        generate_bundle(server_names=["podiam server"])
    with pytest.raises(ValueError, match="at least one"):
        generate_bundle(server_names=[])


# --- writing -----------------------------------------------------------------------------------


def test_keys_are_created_readable_by_their_owner_only(bundle: Bundle, tmp_path: Path) -> None:
    old_umask = os.umask(0)  # whatever the umask, keys must not be created readable by others
    try:
        written = write_bundle(bundle, tmp_path / "out")
    finally:
        os.umask(old_umask)
    assert sorted(p.name for p in written) == sorted(FILES)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in written}
    assert modes["server-key.pem"] == modes["agent-key.pem"] == 0o600
    assert modes["ca.pem"] == modes["server.pem"] == modes["agent.pem"] == 0o644
    assert (tmp_path / "out" / "server.pem").read_bytes() == bundle.server_pem
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(FILES)  # no temp files


def test_writing_refuses_to_overwrite_and_leaves_every_file_alone(
    bundle: Bundle, tmp_path: Path
) -> None:
    (tmp_path / "agent.pem").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match=r"agent\.pem already exists"):
        write_bundle(bundle, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["agent.pem"]
    assert (tmp_path / "agent.pem").read_bytes() == b"precious"


def test_writing_with_force_replaces_the_files(bundle: Bundle, tmp_path: Path) -> None:
    write_bundle(generate_bundle(), tmp_path)
    write_bundle(bundle, tmp_path, force=True)
    for name, data in bundle.files().items():
        assert (tmp_path / name).read_bytes() == data
    assert stat.S_IMODE((tmp_path / "server-key.pem").stat().st_mode) == 0o600


# --- the command line --------------------------------------------------------------------------


def test_cli_generate_then_check_succeeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "certs"
    argv = ["generate", "--out", str(out), "--server-name", "podiam.kube-system.svc"]
    assert main([*argv, "--server-name", "10.1.2.3", "--days", "90"], environ={}) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    capsys.readouterr()

    assert main(["check", str(out)], environ={}) == 0
    printed = capsys.readouterr().out
    assert "DNS:podiam.kube-system.svc, IP:10.1.2.3" in printed
    assert "CN=podiam-agent" in printed and "clientAuth" in printed and "serverAuth" in printed
    assert "(89 days)" in printed


def test_every_readme_generate_example_names_what_the_health_probe_connects_to(tmp_path):
    # The README's commands, run as written (continuation lines joined): each server
    # certificate must carry localhost and 127.0.0.1, or the chart's probe fails its handshake.
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    commands = re.findall(r"^podiam-certs generate (?:.*\\\n)*.*$", readme, re.MULTILINE)
    assert len(commands) >= 2
    for n, command in enumerate(commands):
        argv = shlex.split(command.replace("\\\n", " "))[1:]
        out = tmp_path / str(n)
        argv[argv.index("--out") + 1] = str(out)
        assert main(argv, environ={}) == 0
        server = _cert((out / "server.pem").read_bytes())
        sans = _ext(server, x509.SubjectAlternativeName)
        assert "localhost" in sans.get_values_for_type(x509.DNSName), command
        assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)


def test_cli_generate_refuses_existing_files_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", "--out", str(tmp_path)], environ={}) == 0
    before = (tmp_path / "ca.pem").read_bytes()
    capsys.readouterr()

    assert main(["generate", "--out", str(tmp_path)], environ={}) == 1
    err = capsys.readouterr().err
    assert "ca.pem already exists" in err and "--force" in err and err.count("\n") == 1
    assert (tmp_path / "ca.pem").read_bytes() == before

    assert main(["generate", "--out", str(tmp_path), "--force"], environ={}) == 0
    assert (tmp_path / "ca.pem").read_bytes() != before
    assert main(["check", str(tmp_path)], environ={}) == 0


def test_cli_reads_its_flags_from_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {
        "PODIAM_CERTS_OUT": str(tmp_path),
        "PODIAM_CERTS_SERVER_NAMES": "a.example, 10.0.0.1",
        "PODIAM_CERTS_DAYS": "10",
        "PODIAM_CERTS_KEY_TYPE": "rsa-2048",
    }
    assert main(["generate"], environ=env) == 0
    server = _cert((tmp_path / "server.pem").read_bytes())
    assert server.public_key().key_size == 2048
    sans = _ext(server, x509.SubjectAlternativeName)
    assert sans.get_values_for_type(x509.DNSName) == ["a.example"]
    # A flag wins over its environment twin.
    assert main(["generate", "--out", str(tmp_path / "b"), "--days", "5"], environ=env) == 0
    assert "(4 days)" in _check_output(tmp_path / "b", capsys, warn_days=0)[1]
    # --warn-days from the environment: certificates good for 10 days fail a 20-day warning.
    assert main(["check", str(tmp_path)], environ={"PODIAM_CERTS_WARN_DAYS": "20"}) == 1


def test_cli_usage_errors_are_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate"], environ={}) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out" in err
    assert main(["generate", "--out", "x", "--key-type", "dsa"], environ={}) == 2
    assert main(["generate", "--out", "x", "--days", "0"], environ={}) == 2
    assert main(["check"], environ={}) == 2
    assert main([], environ={}) == 2
    assert main(["--help"], environ={}) == 0
    assert "generate" in capsys.readouterr().out


def _check_output(
    directory: Path, capsys: pytest.CaptureFixture[str], *, warn_days: int = 30
) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["check", str(directory), "--warn-days", str(warn_days)], environ={})
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_check_fails_on_an_expired_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    now = dt.datetime.now(dt.UTC)
    ca = generate_ca(not_before=now - dt.timedelta(days=400), not_after=now + dt.timedelta(days=1))
    expired = generate_bundle(
        ca=ca, not_before=now - dt.timedelta(days=400), not_after=now - dt.timedelta(days=35)
    )
    write_bundle(expired, tmp_path)
    code, _, err = _check_output(tmp_path, capsys, warn_days=0)
    assert code == 1
    assert f"{tmp_path / 'server.pem'}: expired on" in err
    assert f"{tmp_path / 'agent.pem'}: expired on" in err
    assert "ca.pem" not in err


def test_check_fails_on_a_certificate_about_to_expire(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_dir(tmp_path, days=10)
    code, _, err = _check_output(tmp_path, capsys, warn_days=30)
    assert code == 1 and "within --warn-days 30" in err
    assert _check_output(tmp_path, capsys, warn_days=5)[0] == 0


def test_check_fails_on_a_key_of_another_certificate(
    tls_dirs: TlsDirs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(tls_dirs.good, tmp_path, dirs_exist_ok=True)
    shutil.copy(tls_dirs.good / "server-key.pem", tmp_path / "agent-key.pem")
    code, _, err = _check_output(tmp_path, capsys)
    assert code == 1
    assert f"{tmp_path / 'agent-key.pem'}: key does not match certificate" in err
    assert err.count("\n") == 1


def test_check_fails_on_a_certificate_from_another_ca(
    tls_dirs: TlsDirs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(tls_dirs.good, tmp_path, dirs_exist_ok=True)
    for name in ("server.pem", "server-key.pem"):
        shutil.copy(tls_dirs.foreign / name, tmp_path / name)
    code, _, err = _check_output(tmp_path, capsys)
    assert code == 1
    assert (
        err.strip() == f"podiam-certs: {tmp_path / 'server.pem'}: not signed by {tmp_path}/ca.pem"
    )


def test_check_fails_on_swapped_server_and_agent_certificates(
    tls_dirs: TlsDirs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(tls_dirs.good, tmp_path, dirs_exist_ok=True)
    for kind in ("", "-key"):
        shutil.copy(tls_dirs.good / f"agent{kind}.pem", tmp_path / f"server{kind}.pem")
    code, _, err = _check_output(tmp_path, capsys)
    assert code == 1
    assert "server.pem: no serverAuth extended key usage" in err
    assert "server.pem: no subject alternative names" in err


def test_check_fails_on_a_missing_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _check_output(tmp_path / "nowhere", capsys)
    assert code == 1 and "ca.pem: no such file" in err


# --- loading -----------------------------------------------------------------------------------


def test_loading_returns_the_validated_files(tls_dirs: TlsDirs) -> None:
    cert, key, ca = load_tls_material(tls_dirs.server, purpose=Purpose.SERVER)
    assert cert == tls_dirs.server.cert.read_bytes()
    assert key == tls_dirs.server.key.read_bytes()
    assert ca == tls_dirs.server.ca.read_bytes()


def test_loading_names_a_missing_file(tls_dirs: TlsDirs, tmp_path: Path) -> None:
    files = TlsFiles(cert=tmp_path / "server.pem", key=tls_dirs.server.key, ca=tls_dirs.server.ca)
    with pytest.raises(TlsConfigError) as error:
        load_tls_material(files, purpose=Purpose.SERVER)
    assert str(error.value) == f"certificate {tmp_path / 'server.pem'}: no such file"


def test_loading_names_a_file_that_is_not_pem(tls_dirs: TlsDirs, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\nhalf a file")
    with pytest.raises(
        TlsConfigError, match=f"^CA certificate {re.escape(str(garbage))}: not a PEM certificate$"
    ):
        load_tls_material(
            TlsFiles(cert=tls_dirs.agent.cert, key=tls_dirs.agent.key, ca=garbage),
            purpose=Purpose.CLIENT,
        )
    with pytest.raises(
        TlsConfigError, match=f"^key {re.escape(str(garbage))}: not a PEM private key$"
    ):
        load_tls_material(
            TlsFiles(cert=tls_dirs.agent.cert, key=garbage, ca=tls_dirs.agent.ca),
            purpose=Purpose.CLIENT,
        )
    # A key where the certificate belongs is not a certificate either.
    with pytest.raises(TlsConfigError, match="not a PEM certificate"):
        load_tls_material(
            TlsFiles(cert=tls_dirs.agent.key, key=tls_dirs.agent.key, ca=tls_dirs.agent.ca),
            purpose=Purpose.CLIENT,
        )


def test_loading_refuses_a_key_of_another_certificate(tls_dirs: TlsDirs) -> None:
    files = TlsFiles(cert=tls_dirs.agent.cert, key=tls_dirs.server.key, ca=tls_dirs.agent.ca)
    with pytest.raises(TlsConfigError) as error:
        load_tls_material(files, purpose=Purpose.CLIENT)
    assert str(error.value) == (
        f"key {tls_dirs.server.key}: key does not match certificate {tls_dirs.agent.cert}"
    )


def test_loading_refuses_an_expired_certificate(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    ca = generate_ca(not_before=now - dt.timedelta(days=10), not_after=now + dt.timedelta(days=1))
    write_bundle(
        generate_bundle(
            ca=ca, not_before=now - dt.timedelta(days=10), not_after=now - dt.timedelta(days=2)
        ),
        tmp_path,
    )
    with pytest.raises(TlsConfigError) as error:
        channel_credentials(TlsFiles.agent_in(tmp_path))
    assert str(error.value).startswith(f"certificate {tmp_path / 'agent.pem'}: expired on 20")


def test_loading_accepts_a_ca_file_with_an_old_and_a_new_ca(
    tls_dirs: TlsDirs, tmp_path: Path
) -> None:
    now = dt.datetime.now(dt.UTC)
    old_ca, _ = generate_ca(not_before=now - dt.timedelta(days=9), not_after=now - dt.timedelta(1))
    both = tmp_path / "ca.pem"
    both.write_bytes(tls_dirs.agent.ca.read_bytes() + _pem(old_ca))
    load_tls_material(
        TlsFiles(cert=tls_dirs.agent.cert, key=tls_dirs.agent.key, ca=both), purpose=Purpose.CLIENT
    )

    only_old = tmp_path / "old-ca.pem"
    only_old.write_bytes(_pem(old_ca))
    with pytest.raises(TlsConfigError, match="expired on"):
        load_tls_material(
            TlsFiles(cert=tls_dirs.agent.cert, key=tls_dirs.agent.key, ca=only_old),
            purpose=Purpose.CLIENT,
        )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _leaf_with_usages(
    directory: Path, *, ekus: list[x509.ObjectIdentifier] | None, signature: bool = True
) -> TlsFiles:
    """A certificate signed by a new CA with exactly these extended key usages (None: no such
    extension) and a key usage with or without digitalSignature, written to ``directory``."""
    ca_cert, ca_key = generate_ca()
    key = KeyType.ECDSA_P256.generate()
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=signature,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=not signature,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if ekus is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(
        cert=directory / "cert.pem", key=directory / "key.pem", ca=directory / "ca.pem"
    )
    files.cert.write_bytes(_pem(cert))
    files.ca.write_bytes(_pem(ca_cert))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


def test_the_server_refuses_a_client_only_certificate_as_its_own(tls_dirs: TlsDirs) -> None:
    # The agent's certificate (clientAuth only) where the server's belongs: a TLS client would
    # refuse every handshake, so the server must refuse to start instead.
    with pytest.raises(TlsConfigError) as error:
        server_credentials(TlsFiles(tls_dirs.agent.cert, tls_dirs.agent.key, tls_dirs.server.ca))
    assert str(error.value) == (
        f"certificate {tls_dirs.agent.cert}: its extended key usage is clientAuth, not "
        "serverAuth; a server certificate needs serverAuth"
    )


def test_the_agent_refuses_a_server_only_certificate_as_its_client_certificate(
    tls_dirs: TlsDirs,
) -> None:
    with pytest.raises(TlsConfigError) as error:
        channel_credentials(TlsFiles(tls_dirs.server.cert, tls_dirs.server.key, tls_dirs.agent.ca))
    assert str(error.value) == (
        f"certificate {tls_dirs.server.cert}: its extended key usage is serverAuth, not "
        "clientAuth; a client certificate needs clientAuth"
    )


@pytest.mark.parametrize(
    "ekus",
    [
        None,  # no extended key usage: good for any purpose (RFC 5280)
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        [ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE],
    ],
    ids=["no-eku", "both", "any"],
)
def test_certificates_good_for_either_side_are_accepted_by_both(tmp_path: Path, ekus) -> None:
    files = _leaf_with_usages(tmp_path, ekus=ekus)
    load_tls_material(files, purpose=Purpose.SERVER)
    load_tls_material(files, purpose=Purpose.CLIENT)


def test_a_certificate_whose_key_usage_cannot_sign_is_refused(tmp_path: Path) -> None:
    files = _leaf_with_usages(tmp_path, ekus=None, signature=False)
    with pytest.raises(TlsConfigError, match="key usage lacks digitalSignature"):
        load_tls_material(files, purpose=Purpose.SERVER)


async def test_a_server_with_both_usages_in_one_certificate_serves_a_real_agent(
    tmp_path: Path, tls_dirs: TlsDirs
) -> None:
    # What the usage check accepts, gRPC accepts too: the same file as server and client.
    files = _leaf_with_usages(
        tmp_path, ekus=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    async with _serving(files) as port:
        assert await _health(f"localhost:{port}", channel_credentials(files)) == "ok"


# --- real mutual TLS over gRPC -----------------------------------------------------------------


class _Health(kiam_pb2_grpc.KiamServiceServicer):
    async def GetHealth(
        self, request: kiam_pb2.GetHealthRequest, context: grpc.aio.ServicerContext
    ) -> kiam_pb2.HealthStatus:
        return kiam_pb2.HealthStatus(message="ok")


@contextlib.asynccontextmanager
async def _serving(files: TlsFiles, *, reload: bool = False) -> AsyncIterator[int]:
    server = grpc.aio.server()
    kiam_pb2_grpc.add_KiamServiceServicer_to_server(_Health(), server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(files, reload=reload))
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


async def _health(
    target: str, credentials: grpc.ChannelCredentials, *, name_override: str | None = None
) -> str:
    # A private subchannel pool: each call makes its own connection and TLS handshake.
    options: list[tuple[str, str | int]] = [("grpc.use_local_subchannel_pool", 1)]
    if name_override:
        options.append(("grpc.ssl_target_name_override", name_override))
    async with grpc.aio.secure_channel(target, credentials, options=options) as channel:
        stub = kiam_pb2_grpc.KiamServiceStub(channel)
        reply = await stub.GetHealth(kiam_pb2.GetHealthRequest(), timeout=10)
        return reply.message


async def _refused(target: str, credentials: grpc.ChannelCredentials, **kwargs: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await _health(target, credentials, **kwargs)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest_asyncio.fixture(scope="module")
async def server_port(tls_dirs: TlsDirs) -> AsyncIterator[int]:
    async with _serving(tls_dirs.server) as port:
        yield port


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
async def test_agent_reaches_server_by_each_default_name(
    tls_dirs: TlsDirs, server_port: int, host: str
) -> None:
    assert await _health(f"{host}:{server_port}", channel_credentials(tls_dirs.agent)) == "ok"


async def test_agent_reaches_server_by_its_service_name(
    tls_dirs: TlsDirs, server_port: int
) -> None:
    creds = channel_credentials(tls_dirs.agent)
    assert await _health(f"127.0.0.1:{server_port}", creds, name_override="podiam-server") == "ok"


async def test_agent_refuses_a_server_name_not_in_the_certificate(
    tls_dirs: TlsDirs, server_port: int
) -> None:
    creds = channel_credentials(tls_dirs.agent)
    await _refused(f"127.0.0.1:{server_port}", creds, name_override="elsewhere.example")


async def test_server_refuses_a_client_without_a_certificate(
    tls_dirs: TlsDirs, server_port: int
) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=tls_dirs.agent.ca.read_bytes())
    await _refused(f"localhost:{server_port}", creds)


async def test_server_refuses_a_client_certificate_from_another_ca(
    tls_dirs: TlsDirs, server_port: int
) -> None:
    await _refused(f"localhost:{server_port}", channel_credentials(tls_dirs.foreign_agent))


async def test_agent_refuses_a_server_certificate_from_another_ca(tls_dirs: TlsDirs) -> None:
    async with _serving(tls_dirs.foreign_server) as port:
        await _refused(f"localhost:{port}", channel_credentials(tls_dirs.agent))


async def test_reloading_server_uses_rotated_files_for_new_connections(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    live = _write_dir(tmp_path / "live")
    old_agent = channel_credentials(TlsFiles.agent_in(live))
    async with _serving(TlsFiles.server_in(live), reload=True) as port:
        target = f"localhost:{port}"
        assert await _health(target, old_agent) == "ok"

        _write_dir(tmp_path / "next")  # a whole new CA, as `podiam-certs generate --force` makes
        for name in FILES:
            shutil.copy(tmp_path / "next" / name, live / name)
        new_agent = channel_credentials(TlsFiles.agent_in(live))
        assert await _health(target, new_agent) == "ok"
        await _refused(target, old_agent)

        # A half-written certificate: the server keeps the last good material and says so once.
        with caplog.at_level(logging.WARNING, logger="certs.tls"):
            (live / "server.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIB")
            for _ in range(3):
                assert await _health(target, new_agent) == "ok"
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "not a PEM certificate" in warnings[0]

        (live / "server.pem").write_bytes((tmp_path / "next" / "server.pem").read_bytes())
        assert await _health(target, new_agent) == "ok"


async def test_reloading_server_keeps_its_certificate_when_a_client_only_one_is_rotated_in(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    live = _write_dir(tmp_path / "live")
    agent = channel_credentials(TlsFiles.agent_in(live))
    async with _serving(TlsFiles.server_in(live), reload=True) as port:
        target = f"localhost:{port}"
        with caplog.at_level(logging.WARNING, logger="certs.tls"):
            # The agent's pair where the server's belongs (a Secret built from the wrong files).
            for kind in ("", "-key"):
                shutil.copy(live / f"agent{kind}.pem", live / f"server{kind}.pem")
            assert await _health(target, agent) == "ok"
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "clientAuth, not serverAuth" in warnings[0]
