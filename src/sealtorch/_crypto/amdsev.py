"""AMD SEV-SNP certificate and signature primitives (used by ``attestation.snp``).

The SNP verifier decides *what* to check; this module only does the cryptography with
``cryptography``: load AMD's certificates (whose serial numbers are not positive, which
``cryptography`` warns about), check that one certificate is issued by another (RSA-PSS for the
ARK/ASK, ECDSA for test hierarchies), check a CRL's signature, verify an attestation report's
ECDSA P-384 / SHA-384 signature given as little-endian ``r`` and ``s``, and read the VCEK's
AMD extensions. Every function raises ``ValueError`` on malformed input or a bad signature.
"""

from __future__ import annotations

import hashlib
import warnings
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.utils import CryptographyDeprecationWarning

__all__ = [
    "Certificate",
    "Crl",
    "cert_fingerprint",
    "check_issued_by",
    "check_p384_signature",
    "cn_of",
    "crl_revokes",
    "crl_window",
    "extension_bytes",
    "load_certificate",
    "load_certificates_pem",
    "load_crl",
    "validity",
]

Certificate = x509.Certificate
Crl = x509.CertificateRevocationList


def load_certificate(data: bytes) -> Certificate:
    """One certificate, DER or PEM."""
    with warnings.catch_warnings():
        # AMD's ARK, ASK and VCEK certificates have serial number 0
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        try:
            if data.lstrip().startswith(b"-----BEGIN"):
                return x509.load_pem_x509_certificate(data)
            return x509.load_der_x509_certificate(data)
        except ValueError as exc:
            raise ValueError(f"not an X.509 certificate: {exc}") from exc


def load_certificates_pem(data: bytes) -> list[Certificate]:
    """Every certificate of a PEM bundle, in order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        try:
            return x509.load_pem_x509_certificates(data)
        except ValueError as exc:
            raise ValueError(f"not a PEM certificate bundle: {exc}") from exc


def load_crl(data: bytes) -> Crl:
    """A CRL, DER or PEM."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise ValueError(f"not an X.509 CRL: {exc}") from exc


def cert_fingerprint(cert: Certificate) -> str:
    """SHA-256 of the DER encoding, lowercase hex."""
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def cn_of(name: x509.Name) -> str:
    values = name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(values[0].value) if values else ""


def validity(cert: Certificate) -> tuple[datetime, datetime]:
    """(not before, not after), UTC."""
    return cert.not_valid_before_utc, cert.not_valid_after_utc


def check_issued_by(cert: Certificate, issuer: Certificate) -> None:
    """``cert``'s issuer name is ``issuer``'s subject and ``issuer``'s key signed it."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ValueError(
            f"{cn_of(cert.subject) or 'certificate'} is not signed by "
            f"{cn_of(issuer.subject) or 'its issuer'}"
        ) from exc


def crl_revokes(crl: Crl, issuer: Certificate, serials: list[int]) -> list[int]:
    """Check the CRL's issuer and signature; return which of ``serials`` it revokes."""
    if crl.issuer != issuer.subject:
        raise ValueError(
            f"the CRL's issuer ({crl.issuer.rfc4514_string()}) is not "
            f"{issuer.subject.rfc4514_string()}"
        )
    try:
        valid = crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the CRL signature cannot be checked: {exc}") from exc
    if not valid:
        raise ValueError(f"the CRL is not signed by {cn_of(issuer.subject)}")
    return [serial for serial in serials if crl.get_revoked_certificate_by_serial_number(serial)]


def crl_window(crl: Crl) -> tuple[datetime, datetime | None]:
    """(this update, next update), UTC."""
    last = crl.last_update_utc
    following = crl.next_update_utc
    return last.astimezone(UTC), following.astimezone(UTC) if following else None


def extension_bytes(cert: Certificate, oid: str) -> bytes | None:
    """The raw value of a private (unrecognised) extension, or ``None`` when absent."""
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid))
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise ValueError(f"extension {oid} has an unexpected type")
    return value.value


def check_p384_signature(cert: Certificate, message: bytes, r: int, s: int) -> None:
    """``(r, s)`` is an ECDSA P-384 / SHA-384 signature of ``message`` by ``cert``'s key."""
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise ValueError("the endorsement key is not an ECDSA P-384 key")
    try:
        key.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError) as exc:
        raise ValueError("the report signature is invalid") from exc
