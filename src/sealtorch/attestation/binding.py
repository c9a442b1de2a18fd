"""The report_data binding between evidence and a key release request.

An enclave asks its attester for evidence whose 64-byte report_data is::

    SHA-512( lp(DOMAIN_TAG) ‖ lp(nonce) ‖ lp(hpke_suite as UTF-8) ‖ lp(public_key) )

where ``lp(x)`` is the length of ``x`` as a 4-byte big-endian unsigned integer followed by
``x``, and ``DOMAIN_TAG = b"sealtorch/v1/report-data"``. The length prefixes make the encoding
injective: no two different (nonce, suite, key) triples hash the same input. The key server
recomputes the value from the request and compares it with the verified claims; a difference
is the reason code ``binding_mismatch``. See ``docs/attestation.md``.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Final

from sealtorch.attestation.claims import Claims
from sealtorch.attestation.evidence import REPORT_DATA_SIZE
from sealtorch.errors import ConfigError, PolicyDenied

__all__ = [
    "BINDING_DOMAIN_TAG",
    "MIN_NONCE_SIZE",
    "binding_reasons",
    "report_data_for",
    "verify_binding",
]

BINDING_DOMAIN_TAG: Final = b"sealtorch/v1/report-data"
#: Nonces shorter than this cannot guarantee freshness.
MIN_NONCE_SIZE: Final = 16


def _lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def report_data_for(*, nonce: bytes, hpke_suite: str, public_key: bytes) -> bytes:
    """The 64-byte report_data that binds evidence to ``nonce`` and an HPKE public key."""
    values: tuple[object, object, object] = (nonce, hpke_suite, public_key)
    if not isinstance(values[0], bytes) or len(nonce) < MIN_NONCE_SIZE:
        raise ConfigError(f"the nonce must be at least {MIN_NONCE_SIZE} random bytes")
    if not isinstance(values[1], str) or not hpke_suite or not hpke_suite.isprintable():
        raise ConfigError("the HPKE suite must be a non-empty printable string id")
    if not isinstance(values[2], bytes) or not public_key:
        raise ConfigError("the HPKE public key must be non-empty bytes")
    digest = hashlib.sha512(
        _lp(BINDING_DOMAIN_TAG) + _lp(nonce) + _lp(hpke_suite.encode("utf-8")) + _lp(public_key)
    ).digest()
    return digest[:REPORT_DATA_SIZE]  # SHA-512 is exactly 64 bytes


def binding_reasons(claims: Claims, expected_report_data: bytes) -> tuple[str, ...]:
    """``()`` when the claims' report_data equals ``expected_report_data``, else
    ``("binding_mismatch",)``. Constant-time comparison."""
    if hmac.compare_digest(claims.report_data, expected_report_data):
        return ()
    return ("binding_mismatch",)


def verify_binding(claims: Claims, *, nonce: bytes, hpke_suite: str, public_key: bytes) -> Claims:
    """Return ``claims`` if their report_data binds (nonce, suite, key); else raise
    :class:`~sealtorch.errors.PolicyDenied` with ``binding_mismatch``."""
    expected = report_data_for(nonce=nonce, hpke_suite=hpke_suite, public_key=public_key)
    if binding_reasons(claims, expected):
        raise PolicyDenied(
            ["binding_mismatch"],
            "the evidence's report_data does not bind this nonce, HPKE suite and public key "
            "(the evidence was made for another request, or the key was swapped)",
        )
    return claims
