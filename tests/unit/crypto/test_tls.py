"""Development TLS: certificate contents and real TLS handshakes on loopback sockets."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from sealtorch._crypto import tls
from sealtorch.errors import ConfigError


def _make_ca(directory: Path, name: str = "ca") -> tls.CertificatePaths:
    return tls.create_dev_ca(
        cert_path=directory / f"{name}.pem", key_path=directory / f"{name}.key"
    )


def _make_server(
    directory: Path, ca: tls.CertificatePaths, *, names: tuple[str, ...] = (), **kwargs: object
) -> tls.CertificatePaths:
    return tls.create_server_certificate(
        ca=ca,
        cert_path=directory / "server.pem",
        key_path=directory / "server.key",
        names=names,
        **kwargs,  # type: ignore[arg-type]
    )


Pki = tuple[tls.CertificatePaths, tls.CertificatePaths]


@pytest.fixture(scope="module")
def pki(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[tls.CertificatePaths, tls.CertificatePaths]:
    directory = tmp_path_factory.mktemp("pki")
    ca = _make_ca(directory)
    server = _make_server(directory, ca, names=("keys.example.com", "10.1.2.3"))
    return ca, server


class _Server:
    """A one-connection TLS echo server on a loopback socket, run in a thread."""

    def __init__(self, context: ssl.SSLContext, family: socket.AddressFamily, host: str) -> None:
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.bind((host, 0))
        self.listener.listen(1)
        self.listener.settimeout(10)
        self.port: int = self.listener.getsockname()[1]
        self.context = context
        self.error: BaseException | None = None
        self.version: str | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
            conn.settimeout(10)
            with self.context.wrap_socket(conn, server_side=True) as tls_conn:
                self.version = tls_conn.version()
                tls_conn.sendall(tls_conn.recv(64).upper())
        except (ssl.SSLError, OSError) as exc:
            self.error = exc
        finally:
            self.listener.close()

    def join(self) -> None:
        self.thread.join(10)


def _handshake(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    *,
    server_hostname: str,
    family: socket.AddressFamily = socket.AF_INET,
    host: str = "127.0.0.1",
) -> tuple[bytes, _Server]:
    server = _Server(server_ctx, family, host)
    try:
        with (
            socket.create_connection((host, server.port), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname=server_hostname) as conn,
        ):
            conn.sendall(b"hello")
            reply = conn.recv(64)
    finally:
        server.join()
    return reply, server


def _contexts(
    pki: Pki,
) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca, server = pki
    return (
        tls.server_ssl_context(cert_path=server.cert, key_path=server.key),
        tls.client_ssl_context(ca_path=ca.cert),
    )


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1", "keys.example.com"])
def test_handshake_succeeds_for_every_name(pki: Pki, hostname: str) -> None:
    server_ctx, client_ctx = _contexts(pki)
    reply, server = _handshake(server_ctx, client_ctx, server_hostname=hostname)
    assert reply == b"HELLO"
    assert server.error is None
    assert server.version in {"TLSv1.2", "TLSv1.3"}


def test_handshake_over_ipv6_loopback(
    pki: Pki,
) -> None:
    if not socket.has_ipv6:
        pytest.fail("this machine has no IPv6 support; the dev certificate covers ::1")
    try:
        probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        # Containers without an IPv6 loopback: the SAN is still checked below.
        _, server = pki
        cert = x509.load_pem_x509_certificate(server.cert.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert ipaddress.ip_address("::1") in san.get_values_for_type(x509.IPAddress)
        return
    server_ctx, client_ctx = _contexts(pki)
    reply, _ = _handshake(
        server_ctx, client_ctx, server_hostname="::1", family=socket.AF_INET6, host="::1"
    )
    assert reply == b"HELLO"


def test_client_with_another_ca_fails(pki: Pki, tmp_path: Path) -> None:
    other_ca = _make_ca(tmp_path, "other")
    server_ctx, _ = _contexts(pki)
    client_ctx = tls.client_ssl_context(ca_path=other_ca.cert)
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        _handshake(server_ctx, client_ctx, server_hostname="localhost")


def test_client_does_not_trust_system_roots(
    pki: Pki,
) -> None:
    ca, _ = pki
    context = tls.client_ssl_context(ca_path=ca.cert)
    assert len(context.get_ca_certs()) == 1
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert context.check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED


def test_wrong_hostname_fails(pki: Pki) -> None:
    server_ctx, client_ctx = _contexts(pki)
    with pytest.raises(
        ssl.SSLCertVerificationError, match=r"Hostname mismatch|IP address mismatch"
    ):
        _handshake(server_ctx, client_ctx, server_hostname="evil.example.com")


def test_expired_certificate_fails(tmp_path: Path) -> None:
    ca = _make_ca(tmp_path)
    past = datetime.now(UTC) - timedelta(days=30)
    server = _make_server(tmp_path, ca, now=past, validity=timedelta(days=1))
    server_ctx = tls.server_ssl_context(cert_path=server.cert, key_path=server.key)
    client_ctx = tls.client_ssl_context(ca_path=ca.cert)
    with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
        _handshake(server_ctx, client_ctx, server_hostname="localhost")


def test_tls_1_1_client_is_refused(pki: Pki) -> None:
    ca, _ = pki
    server_ctx, _ = _contexts(pki)
    assert server_ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(cafile=ca.cert)
    with warnings.catch_warnings():  # TLS 1.1 is deprecated; this client is the attacker
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    server = _Server(server_ctx, socket.AF_INET, "127.0.0.1")
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
        pytest.raises(ssl.SSLError),
    ):
        old.wrap_socket(raw, server_hostname="localhost")
    server.join()
    # The server itself refused the protocol version (not just the client giving up).
    assert isinstance(server.error, ssl.SSLError)
    assert "version" in str(server.error).lower() or "protocol" in str(server.error).lower()


def test_ca_certificate_contents(pki: Pki) -> None:
    ca, _ = pki
    cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical
    assert basic.value.ca
    assert basic.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign
    assert usage.value.crl_sign
    assert not usage.value.digital_signature
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc >= timedelta(days=3000)


def test_server_certificate_contents(
    pki: Pki,
) -> None:
    ca, server = pki
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    cert = x509.load_pem_x509_certificate(server.cert.read_bytes())
    cert.verify_directly_issued_by(ca_cert)
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical
    assert not basic.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not usage.value.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "keys.example.com"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.1.2.3"),
    }
    validity = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=300) < validity <= tls.SERVER_VALIDITY
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest


def test_key_files_are_private_and_never_overwritten(
    pki: Pki,
) -> None:
    ca, server = pki
    for key in (ca.key, server.key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    before = ca.key.read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        tls.create_dev_ca(cert_path=ca.cert, key_path=ca.key)
    with pytest.raises(ConfigError, match="already exists"):
        tls.create_server_certificate(ca=ca, cert_path=server.cert, key_path=server.key)
    assert ca.key.read_bytes() == before


def test_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    ca = _make_ca(tmp_path)
    server = _make_server(tmp_path, ca)
    server.key.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        tls.server_ssl_context(cert_path=server.cert, key_path=server.key)


def test_mismatched_ca_key_is_refused(tmp_path: Path) -> None:
    one = _make_ca(tmp_path, "one")
    two = _make_ca(tmp_path, "two")
    mixed = tls.CertificatePaths(cert=one.cert, key=two.key)
    with pytest.raises(ConfigError, match="is not the private key"):
        _make_server(tmp_path, mixed)


def test_bad_names_and_garbage_files(tmp_path: Path) -> None:
    ca = _make_ca(tmp_path)
    with pytest.raises(ConfigError, match="neither an IP address nor a DNS name"):
        _make_server(tmp_path, ca, names=("a" * 70 + ".example",))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(ConfigError, match="PEM"):
        _make_server(tmp_path, tls.CertificatePaths(cert=garbage, key=ca.key))
    with pytest.raises(ConfigError, match="trust anchor"):
        tls.client_ssl_context(ca_path=garbage)


def test_naive_time_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        tls.create_dev_ca(
            cert_path=tmp_path / "c.pem",
            key_path=tmp_path / "c.key",
            now=datetime(2030, 1, 1),  # naive on purpose
        )


def _raised_from(exc: BaseException) -> Exception:
    """``exc`` two levels down an exception chain, as httpx raises a failed handshake."""
    middle = ConnectionError("handshake failed")
    middle.__cause__ = exc
    outer = RuntimeError("connect failed")
    outer.__cause__ = middle
    return outer


def test_untrusted_server_messages_say_what_to_pass(pki: Pki, tmp_path: Path) -> None:
    server_ctx, client_ctx = _contexts(pki)
    other_ca = tls.client_ssl_context(ca_path=_make_ca(tmp_path, "other").cert)
    with pytest.raises(ssl.SSLCertVerificationError) as untrusted:
        _handshake(server_ctx, other_ca, server_hostname="localhost")
    with pytest.raises(ssl.SSLCertVerificationError) as misnamed:
        _handshake(server_ctx, client_ctx, server_hostname="evil.example.com")

    def message(exc: BaseException, **options: bool) -> str | None:
        return tls.untrusted_server_message(
            _raised_from(exc),
            server="the key server at https://k:8443",
            ca_option="--ca",
            **options,
        )

    assert message(untrusted.value) == (
        "the TLS certificate of the key server at https://k:8443 is not trusted (unable to get "
        "local issuer certificate); pass the CA certificate that issued it with --ca; a "
        "sealtorch key server's CA certificate is its DATA_DIR/tls/ca.crt"
    )
    assert message(untrusted.value, key_server=False) == (
        "the TLS certificate of the key server at https://k:8443 is not trusted (unable to get "
        "local issuer certificate); pass the CA certificate that issued it with --ca"
    )
    named = message(misnamed.value)
    assert named is not None
    assert named.startswith(
        "the TLS certificate of the key server at https://k:8443 does not name the host it "
        "was reached by (Hostname mismatch, certificate is not valid for 'evil.example.com')"
    )
    assert "keyserver init --name" in named
    assert message(ConnectionRefusedError(111, "refused")) is None
