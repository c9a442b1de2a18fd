"""Read-only facts from X.509 certificates and CRLs (DCAP collateral bookkeeping).

Nothing here *verifies* a signature: ``dcap-qvl`` does the cryptographic verification of quotes
and collateral against Intel's root. These helpers only read validity dates, issuer names and
CRL distribution points so that sealtorch can tell when collateral goes stale, file it under the
right CA, and fetch a root CA CRL. Every function raises ``ValueError`` on malformed input.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

__all__ = [
    "ChainInfo",
    "CrlInfo",
    "chain_info",
    "crl_info",
    "crl_to_der",
]

_HEX = re.compile(rb"\s*(?:[0-9a-fA-F]{2})+\s*")


@dataclass(frozen=True)
class CrlInfo:
    issuer_cn: str
    this_update: datetime
    next_update: datetime


@dataclass(frozen=True)
class ChainInfo:
    subject_cns: tuple[str, ...]
    #: Latest ``notBefore`` and earliest ``notAfter`` over the chain (UTC).
    not_before: datetime
    not_after: datetime
    #: First CRL distribution point URL of the last (root) certificate, if any.
    root_crl_url: str | None


def _cn(name: x509.Name) -> str:
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not values:
        return ""
    value = values[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def crl_to_der(body: bytes) -> bytes:
    """Normalise a CRL given as DER, PEM or hex text (PCCS variants) to DER."""
    stripped = body.strip()
    if stripped.startswith(b"-----BEGIN"):
        return x509.load_pem_x509_crl(stripped).public_bytes(Encoding.DER)
    if _HEX.fullmatch(stripped):
        try:
            return binascii.unhexlify(stripped)
        except binascii.Error as exc:  # pragma: no cover - the regex admits only hex pairs
            raise ValueError("CRL is not valid hex") from exc
    return bytes(body)


def crl_info(der: bytes) -> CrlInfo:
    crl = x509.load_der_x509_crl(der)
    next_update = crl.next_update_utc
    if next_update is None:
        raise ValueError("CRL has no nextUpdate")
    return CrlInfo(
        issuer_cn=_cn(crl.issuer),
        this_update=crl.last_update_utc,
        next_update=next_update,
    )


def chain_info(pem: str | bytes) -> ChainInfo:
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    certs = x509.load_pem_x509_certificates(data)
    if not certs:  # pragma: no cover - cryptography raises on an empty chain
        raise ValueError("no certificate in chain")
    root_url: str | None = None
    try:
        points = certs[-1].extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        points = None
    for point in points or ():
        for general_name in point.full_name or ():
            if isinstance(general_name, x509.UniformResourceIdentifier):
                root_url = general_name.value
                break
        if root_url:
            break
    return ChainInfo(
        subject_cns=tuple(_cn(cert.subject) for cert in certs),
        not_before=max(cert.not_valid_before_utc for cert in certs),
        not_after=min(cert.not_valid_after_utc for cert in certs),
        root_crl_url=root_url,
    )
