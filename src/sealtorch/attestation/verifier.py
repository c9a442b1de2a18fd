"""The verifier interface, a dispatcher over verifiers, and error → reason code mapping."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol, runtime_checkable

from sealtorch.attestation.claims import Claims
from sealtorch.attestation.evidence import Evidence, EvidenceType
from sealtorch.errors import (
    AttestationError,
    CollateralError,
    ConfigError,
    EvidenceError,
    PolicyDenied,
)

__all__ = [
    "UnsupportedEvidenceError",
    "UntrustedAttestationKeyError",
    "Verifier",
    "VerifierSet",
    "reason_for_error",
]


class UnsupportedEvidenceError(EvidenceError):
    """No verifier is configured for this type of evidence (e.g. sim evidence at a key server
    that trusts no simulated attestation key)."""

    def __init__(self, evidence_type: str, message: str) -> None:
        super().__init__(message)
        self.evidence_type = evidence_type


class UntrustedAttestationKeyError(EvidenceError):
    """Simulated evidence is signed by a key the verifier was not configured to trust."""


@runtime_checkable
class Verifier(Protocol):
    """Turns evidence into :class:`~sealtorch.attestation.Claims`, or raises.

    Raises :class:`~sealtorch.errors.EvidenceError` (malformed, bad signature, wrong type) or
    :class:`~sealtorch.errors.CollateralError` (``stale=True`` when collateral expired).
    ``now`` is the verifier's clock (timezone-aware).
    """

    @property
    def evidence_types(self) -> frozenset[EvidenceType]:
        """The evidence types this verifier accepts."""
        ...

    def verify(self, evidence: Evidence, *, now: datetime) -> Claims:
        """Verify ``evidence`` at time ``now`` and return its claims."""
        ...


class VerifierSet:
    """Dispatches evidence to the verifier configured for its type.

    Evidence of a type no verifier handles is refused with :class:`UnsupportedEvidenceError`,
    so a key server that was not given sim trust keys simply cannot accept sim evidence.
    """

    def __init__(self, *verifiers: Verifier) -> None:
        by_type: dict[EvidenceType, Verifier] = {}
        for verifier in verifiers:
            for kind in verifier.evidence_types:
                if kind in by_type:
                    raise ConfigError(f"two verifiers are configured for {kind!r} evidence")
                by_type[kind] = verifier
        self._by_type = by_type

    @property
    def evidence_types(self) -> frozenset[EvidenceType]:
        """The evidence types accepted (what a challenge response advertises)."""
        return frozenset(self._by_type)

    def verify(self, evidence: Evidence, *, now: datetime) -> Claims:
        verifier = self._by_type.get(evidence.type)
        if verifier is None:
            accepted = ", ".join(sorted(self._by_type)) or "none"
            hint = (
                " (simulated TEEs are accepted only when trusted sim attestation keys are "
                "configured)"
                if evidence.type == "sim"
                else ""
            )
            raise UnsupportedEvidenceError(
                evidence.type,
                f"{evidence.type!r} evidence is not accepted here; accepted: {accepted}{hint}",
            )
        return verifier.verify(evidence, now=now)

    def __repr__(self) -> str:
        return f"VerifierSet({', '.join(sorted(self._by_type))})"


def reason_for_error(exc: AttestationError) -> str:
    """The stable reason code for a verification failure (see ``docs/policy.md``)."""
    if isinstance(exc, PolicyDenied):
        return exc.reasons[0] if exc.reasons else "policy_denied"
    if isinstance(exc, CollateralError):
        return "collateral_stale" if exc.stale else "collateral_unavailable"
    if isinstance(exc, UnsupportedEvidenceError):
        return "simulated_not_allowed" if exc.evidence_type == "sim" else "tee_not_allowed"
    if isinstance(exc, UntrustedAttestationKeyError):
        return "attestation_key_untrusted"
    return "evidence_invalid"
