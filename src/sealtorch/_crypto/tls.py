"""Development TLS: a private CA, a server certificate, and ``ssl.SSLContext`` helpers.

``sealtorch keyserver init`` uses this to give a fresh key server HTTPS out of the box. The CA
is for development and single-site deployments; in production use certificates from your own
PKI and point :func:`server_ssl_context` / :func:`client_ssl_context` at them.

* Keys are ECDSA P-256, written as unencrypted PKCS#8 PEM with mode 0600 (never overwritten).
* The CA certificate is ``CA:TRUE, pathlen:0`` with ``keyCertSign, cRLSign``.
* The server certificate is ``CA:FALSE`` with ``digitalSignature``, ``serverAuth`` and a
  subjectAltName for ``localhost``, ``127.0.0.1`` and ``::1`` plus any extra names and addresses.
* Contexts require TLS 1.2 or newer; the client context trusts *only* the given CA file and
  checks host names.

:func:`untrusted_server_message` turns a failed certificate check, found anywhere in an
exception's chain (httpx wraps it twice), into a message that says what to pass.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sealtorch.errors import ConfigError

__all__ = [
    "DEFAULT_SERVER_NAMES",
    "CertificatePaths",
    "client_ssl_context",
    "create_dev_ca",
    "create_server_certificate",
    "server_ssl_context",
    "untrusted_server_message",
]

#: OpenSSL's X509_V_ERR_{HOSTNAME,EMAIL,IP_ADDRESS}_MISMATCH: the chain is trusted, not the name.
_NAME_MISMATCH = frozenset({62, 63, 64})

#: Names every development server certificate covers.
DEFAULT_SERVER_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")

CA_VALIDITY = timedelta(days=3650)
#: 397 days: the longest validity that public browsers still accept for server certificates.
SERVER_VALIDITY = timedelta(days=397)
# Tolerate small clock differences between machines.
_BACKDATE = timedelta(minutes=5)


@dataclass(frozen=True)
class CertificatePaths:
    """Where a certificate and its private key were written."""

    cert: Path
    key: Path


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(UTC)


def _write_new(path: Path, data: bytes, *, mode: int) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError as exc:
        raise ConfigError(
            f"{path} already exists; sealtorch does not overwrite keys or certificates "
            "(move it away first if you really want a new one)"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"cannot create {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_pair(
    paths: CertificatePaths, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> None:
    for path in (paths.cert, paths.key):
        if path.exists() or path.is_symlink():
            raise ConfigError(
                f"{path} already exists; sealtorch does not overwrite keys or certificates "
                "(move it away first if you really want a new one)"
            )
    _write_new(paths.key, _key_pem(key), mode=0o600)
    _write_new(paths.cert, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def create_dev_ca(
    *,
    cert_path: str | os.PathLike[str],
    key_path: str | os.PathLike[str],
    common_name: str = "sealtorch development CA",
    validity: timedelta = CA_VALIDITY,
    now: datetime | None = None,
) -> CertificatePaths:
    """Create a self-signed development CA; the key file gets mode 0600. Never overwrites."""
    start = _now(now) - _BACKDATE
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sealtorch"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    paths = CertificatePaths(cert=Path(cert_path), key=Path(key_path))
    _write_pair(paths, cert, key)
    return paths


def _spki(public_key: CertificatePublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _load_ca(ca: CertificatePaths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
        key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"cannot read the CA certificate or key: {exc}") from exc
    except ValueError as exc:
        raise ConfigError(
            f"{ca.cert} / {ca.key} are not a PEM certificate and an unencrypted PEM key"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{ca.key} is not an ECDSA key; create the CA with create_dev_ca")
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise ConfigError(f"{ca.key} is not the private key of {ca.cert}")
    return cert, key


def _split_names(
    names: Iterable[str],
) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    dns: list[str] = []
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            try:
                ascii_name = name.encode("idna").decode("ascii").lower()
            except UnicodeError as exc:
                raise ConfigError(f"{name!r} is neither an IP address nor a DNS name") from exc
            if ascii_name not in dns:
                dns.append(ascii_name)
        else:
            if address not in ips:
                ips.append(address)
    return dns, ips


def create_server_certificate(
    *,
    ca: CertificatePaths,
    cert_path: str | os.PathLike[str],
    key_path: str | os.PathLike[str],
    names: Iterable[str] = (),
    validity: timedelta = SERVER_VALIDITY,
    now: datetime | None = None,
) -> CertificatePaths:
    """Issue a server certificate from the CA at ``ca`` for the default names plus ``names``.

    ``names`` may mix DNS names and IP addresses (``"keys.example.com"``, ``"10.0.0.5"``).
    The key file gets mode 0600. Never overwrites.
    """
    ca_cert, ca_key = _load_ca(ca)
    dns, ips = _split_names([*DEFAULT_SERVER_NAMES, *names])
    start = _now(now) - _BACKDATE
    end = min(start + validity, ca_cert.not_valid_after_utc)
    key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    alt_names += [x509.IPAddress(ip) for ip in ips]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sealtorch"),
                    x509.NameAttribute(NameOID.COMMON_NAME, dns[0] if dns else str(ips[0])),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = CertificatePaths(cert=Path(cert_path), key=Path(key_path))
    _write_pair(paths, cert, key)
    return paths


def _check_key_file(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"cannot read TLS key {path}: {exc.strerror}") from exc
    if mode & 0o077:
        raise ConfigError(
            f"TLS private key {path} is readable by other users (mode {mode & 0o777:o}); "
            f"run `chmod 600 {path}`"
        )


def server_ssl_context(
    *,
    cert_path: str | os.PathLike[str],
    key_path: str | os.PathLike[str],
) -> ssl.SSLContext:
    """A TLS ≥ 1.2 server context. Refuses a private key file that other users can read."""
    _check_key_file(Path(key_path))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=os.fspath(cert_path), keyfile=os.fspath(key_path))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the TLS certificate {cert_path} and key {key_path}: {exc}"
        ) from exc
    return context


def client_ssl_context(*, ca_path: str | os.PathLike[str]) -> ssl.SSLContext:
    """A TLS ≥ 1.2 client context that trusts only the CA in ``ca_path`` and checks host names."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_verify_locations(cafile=os.fspath(ca_path))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS trust anchor {ca_path}: {exc}") from exc
    return context


def _certificate_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLCertVerificationError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def untrusted_server_message(
    exc: BaseException, *, server: str, ca_option: str, key_server: bool = True
) -> str | None:
    """What to do when ``exc`` (or an exception it was raised from) is a failed check of the
    server's TLS certificate; ``None`` for any other failure.

    ``server`` names the peer ("the key server at https://..."); ``ca_option`` is how the
    caller passes a CA certificate ("--ca"); ``key_server``: the peer may be a sealtorch key
    server, whose generated CA and certificate names are worth pointing at.
    """
    error = _certificate_error(exc)
    if error is None:
        return None
    reason = (error.verify_message or str(error)).rstrip(".")
    if error.verify_code in _NAME_MISMATCH:
        hint = "; a sealtorch key server's certificate names those given to `keyserver init --name`"
        return (
            f"the TLS certificate of {server} does not name the host it was reached by "
            f"({reason}); use a name it was issued for{hint if key_server else ''}"
        )
    hint = "; a sealtorch key server's CA certificate is its DATA_DIR/tls/ca.crt"
    return (
        f"the TLS certificate of {server} is not trusted ({reason}); pass the CA certificate "
        f"that issued it with {ca_option}{hint if key_server else ''}"
    )
