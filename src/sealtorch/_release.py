"""The key release protocol's rules, shared by the key server and the key cache.

Both serve the same protocol (``docs/protocol.md``) — the key server from its store, the key
cache from the keys it holds — so what a client sees must not depend on which one answers. This
module holds the parts that are the protocol rather than either side's state: the refusal of a
request (of a :class:`sealtorch.errors.ErrorKind`), the request's own checks (HPKE public key,
evidence, report_data binding), the cap that collateral freshness puts on leases and sessions,
a renewal's restriction to its session's models, a policy denial, the sealing of one granted
key (with the key server's signed release statement about it), the response (asking for every
model never reveals the ids of denied ones), and the reporting of each outcome (log line and
observer).

Each side keeps its own nonces, sessions, decisions and audit. Nothing here does I/O, and the
request checks do exactly the work either side did before (the key server's release path is
performance-tuned).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, NoReturn

from sealtorch._crypto import hpke
from sealtorch.attestation import (
    Claims,
    Decision,
    Evidence,
    VerifierSet,
    binding_reasons,
    reason_for_error,
    report_data_for,
)
from sealtorch.errors import AttestationError, ErrorKind, ProtocolError, RequestError
from sealtorch.protocol import (
    HPKE_SUITES,
    ChallengeResponse,
    DeniedModel,
    GrantedKey,
    ReleaseRequest,
    ReleaseResponse,
    SessionGrant,
    SignedStatement,
    key_release_info,
)

__all__ = [
    "INLINE_EVIDENCE",
    "MAX_DENIAL_MESSAGE",
    "NONCE_EXPIRED",
    "NONCE_INVALID",
    "NONCE_SIZE",
    "CheckedRequest",
    "DecisionObserver",
    "ErrorKind",
    "OutcomeReporter",
    "Refusal",
    "RequestError",
    "check_release_request",
    "collateral_cap",
    "decision_name",
    "new_challenge",
    "policy_denial",
    "release_response",
    "seal_key",
    "session_models",
]

#: Challenge nonces are 32 random bytes.
NONCE_SIZE: Final = 32
#: Longest policy message passed on to a client in a denial.
MAX_DENIAL_MESSAGE: Final = 2000
#: Evidence types verified on the event loop (``sim``: ~0.15 ms); others (DCAP, ~1 ms) in a
#: worker thread.
INLINE_EVIDENCE: Final = frozenset({"sim"})


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is refused as a whole (before any model is decided)."""

    kind: ErrorKind
    code: str
    message: str


NONCE_INVALID: Final = Refusal(
    ErrorKind.FORBIDDEN,
    "nonce_invalid",
    "the challenge nonce is unknown or was already used; request a new challenge and attest again",
)
NONCE_EXPIRED: Final = Refusal(
    ErrorKind.FORBIDDEN,
    "nonce_expired",
    "the challenge nonce expired before the release request; request a new challenge and "
    "attest again promptly",
)
_BINDING_MISMATCH: Final = (
    "the evidence's report_data does not bind this request's nonce, HPKE suite and public key "
    "(evidence made for another request, or the key was swapped)"
)


def new_challenge(
    nonce: bytes, *, expires_at: datetime, evidence_types: tuple[str, ...]
) -> ChallengeResponse:
    """The challenge for a fresh single-use nonce of :data:`NONCE_SIZE` bytes (made and kept
    by the caller: the key cache keeps random ones, the key server mints its own)."""
    return ChallengeResponse(
        nonce=nonce, expires_at=expires_at, hpke_suites=HPKE_SUITES, evidence_types=evidence_types
    )


@dataclass(frozen=True, slots=True)
class CheckedRequest:
    """What a release request's own checks found (no nonce, no model involved yet).

    ``claims`` is set whenever the evidence verified, even when the binding then failed (the key
    server audits them); ``recipient`` whenever the public key decoded.
    """

    recipient: hpke.HpkePublicKey | None = None
    claims: Claims | None = None
    refusal: Refusal | None = None

    def accepted(self) -> tuple[hpke.HpkePublicKey, Claims]:
        """The recipient key and claims of a request that passed (``refusal`` is ``None``)."""
        recipient, claims = self.recipient, self.claims
        # Invariants: callers refuse the request first; both are set whenever there is no refusal.
        assert self.refusal is None  # noqa: S101
        assert recipient is not None  # noqa: S101
        assert claims is not None  # noqa: S101
        return recipient, claims


def check_release_request(
    request: ReleaseRequest, verifiers: VerifierSet, *, now: datetime
) -> CheckedRequest:
    """Decode the HPKE public key, verify the evidence, check its report_data binding.

    The first failure is returned as the refusal: ``invalid_public_key``, the verifier's reason
    code (``evidence_invalid``, ``attestation_key_untrusted``...), ``binding_mismatch``.
    """
    suite = request.hpke.suite
    public_key = request.hpke.public_key
    try:
        recipient = hpke.HpkePublicKey.decode(suite, public_key)
    except ProtocolError as exc:
        return CheckedRequest(refusal=Refusal(ErrorKind.INVALID, "invalid_public_key", str(exc)))
    try:
        evidence = Evidence(type=request.evidence.type, data=request.evidence.data)
        claims = verifiers.verify(evidence, now=now)
    except AttestationError as exc:
        code = reason_for_error(exc)
        return CheckedRequest(
            recipient=recipient,
            refusal=Refusal(ErrorKind.FORBIDDEN, code, f"evidence refused: {exc}"),
        )
    expected = report_data_for(nonce=request.nonce, hpke_suite=suite, public_key=public_key)
    if binding_reasons(claims, expected):
        return CheckedRequest(
            recipient=recipient,
            claims=claims,
            refusal=Refusal(ErrorKind.FORBIDDEN, "binding_mismatch", _BINDING_MISMATCH),
        )
    return CheckedRequest(recipient=recipient, claims=claims)


def collateral_cap(end: datetime, claims: Claims) -> datetime:
    """``end``, but never later than the freshness of the collateral that verified the claims:
    leases and sessions do not outlive it."""
    if claims.collateral_next_update is not None:
        return min(end, claims.collateral_next_update.astimezone(UTC))
    return end


def session_models(
    requested: tuple[str, ...] | None, allowed: tuple[str, ...] | None
) -> tuple[tuple[str, ...] | None, list[DeniedModel]]:
    """A renewal's models: those ``requested`` (``None``: all) within the session's original
    release (``allowed``; ``None``: every model). Returns the models to decide and the
    ``not_in_session`` denials of the others."""
    if allowed is None:
        return requested, []
    if requested is None:
        return allowed, []
    inside = set(allowed)
    outside = [
        DeniedModel(
            model_id=model_id,
            reasons=("not_in_session",),
            message=f"model {model_id!r} was not part of this session's release",
        )
        for model_id in requested
        if model_id not in inside
    ]
    return tuple(m for m in requested if m in inside), outside


def policy_denial(model_id: str, decision: Decision) -> DeniedModel:
    """The denial of a model whose release policy did not allow the claims."""
    return DeniedModel(
        model_id=model_id,
        reasons=decision.reasons,
        message=decision.message[:MAX_DENIAL_MESSAGE],
    )


def seal_key(
    material: bytes,
    *,
    suite: str,
    recipient: hpke.HpkePublicKey,
    model_id: str,
    key_version: int,
    request_id: str,
    request_nonce: bytes,
    policy: dict[str, Any],
    policy_version: int,
    policy_digest: str,
    lease_expires_at: datetime,
    statement: SignedStatement,
) -> GrantedKey:
    """One granted data key, HPKE-sealed to ``recipient`` with :func:`key_release_info` binding
    model, version, request, nonce, policy and lease, with the key server's signed
    ``statement`` about it (the key server's own; a key cache forwards the one it received)."""
    info = key_release_info(
        model_id=model_id,
        key_version=key_version,
        request_id=request_id,
        request_nonce=request_nonce,
        policy_digest=policy_digest,
        lease_expires_at=lease_expires_at,
    )
    return GrantedKey(
        model_id=model_id,
        key_version=key_version,
        sealed_key=hpke.seal(suite, recipient, material, info=info),
        lease_expires_at=lease_expires_at,
        policy=policy,
        policy_version=policy_version,
        policy_digest=policy_digest,
        statement=statement,
    )


def release_response(
    *,
    request_id: str,
    server_time: datetime,
    granted: tuple[GrantedKey, ...],
    denials: Sequence[DeniedModel],
    requested: Sequence[str] | None,
    session: SessionGrant | None = None,
) -> ReleaseResponse:
    """The answer to a release or renewal that was decided."""
    return ReleaseResponse(
        request_id=request_id,
        server_time=server_time,
        granted=granted,
        # Asking for "every model" must not reveal the ids of models one may not have.
        denied=tuple(denials) if requested is not None else (),
        session=session,
    )


def decision_name(*, granted: bool, denied: bool) -> str:
    """A decided request's decision: ``allow`` (all granted), ``partial`` or ``deny``."""
    return "allow" if granted and not denied else "partial" if granted else "deny"


#: Told about every release/renew outcome: ``(action, decision, reason codes, keys released)``.
DecisionObserver = Callable[[str, str, list[str], int], None]


def _ignore(action: str, decision: str, reasons: list[str], keys: int) -> None:
    del action, decision, reasons, keys


class OutcomeReporter:
    """Logs and counts the outcome of each release/renew request.

    ``label`` prefixes the log lines (the key cache's say ``local release ...``); refusals are
    raised as ``error`` (the side's :class:`RequestError` subclass).
    """

    def __init__(
        self,
        log: logging.Logger,
        observer: DecisionObserver | None,
        *,
        error: type[RequestError],
        label: str = "",
    ) -> None:
        self._log = log
        self._observe: DecisionObserver = observer or _ignore
        self._error = error
        self._refused = f"{label}%s refused"

    def refuse(self, action: str, request_id: str, refusal: Refusal) -> NoReturn:
        """Log and count a refused request, then raise it."""
        self._log.info(
            self._refused, action, extra={"request_id": request_id, "code": refusal.code}
        )
        self._observe(action, "refuse", [refusal.code], 0)
        raise self._error(refusal.kind, refusal.code, refusal.message, reasons=(refusal.code,))

    def decided(
        self, action: str, *, granted: bool, denials: Sequence[DeniedModel], released: int
    ) -> str:
        """Count a decided request; returns its decision (``allow``, ``partial``, ``deny``)."""
        decision = decision_name(granted=granted, denied=bool(denials))
        self._observe(action, decision, [r for d in denials for r in d.reasons], released)
        return decision
