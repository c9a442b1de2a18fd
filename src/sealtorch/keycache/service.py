"""The key cache's side of the key release protocol, for local enclaves (``docs/protocol.md``).

:class:`LocalReleaseService` answers ``challenge``, ``release`` and ``renew`` exactly as the key
server does — same schemas, same steps in the same order, same error codes — from the keys the
cache holds. It knows nothing about HTTP (the app in :mod:`sealtorch.keycache.app` translates).

Release, stopping at the first failure:

1. consume the challenge nonce (in memory, single use, short expiry) → ``nonce_invalid`` /
   ``nonce_expired``;
2. decode the client's HPKE public key → ``invalid_public_key``;
3. verify the evidence with the cache's local verifiers → the same reason codes as the key
   server (``evidence_invalid``, ``attestation_key_untrusted``, ``simulated_not_allowed``...);
4. check the report_data binding → ``binding_mismatch``;
5. for each model: the cache must hold a key with a running lease (else ``lease_expired`` or
   ``not_cached``), and **the policy the key server sent with that key** must allow the claims
   (same evaluation, same reason codes as at the key server) — so a cache is never more
   permissive than the server;
6. HPKE-seal each granted key to the client with ``key_release_info`` (model, version, request
   id, nonce, policy digest, lease) and the *remaining* lease of the cache's own key.

Every decision is logged (structured, without secrets) and reported to an observer (metrics).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import NoReturn

from sealtorch._crypto import hpke
from sealtorch.attestation import (
    Claims,
    Evidence,
    VerifierSet,
    binding_reasons,
    reason_for_error,
    report_data_for,
)
from sealtorch.errors import AttestationError, Error, ProtocolError
from sealtorch.keycache.holdings import MODEL_LEVEL_REASONS, HeldKey, Holdings
from sealtorch.protocol import (
    HPKE_SUITES,
    ChallengeResponse,
    DeniedModel,
    GrantedKey,
    ReleaseRequest,
    ReleaseResponse,
    RenewRequest,
    SessionGrant,
    key_release_info,
)

__all__ = [
    "CACHE_REASON_CODES",
    "DecisionObserver",
    "ErrorKind",
    "LocalError",
    "LocalReleaseService",
]

_log = logging.getLogger("sealtorch.keycache.release")

#: Reason codes only a key cache gives (the policy codes are in ``docs/policy.md``).
CACHE_REASON_CODES = {
    "lease_expired": "the cache's lease on the key ended and it could not renew it (the key "
    "server is unreachable); retry when the key server is back",
    "not_cached": "the cache holds no key for the model: not in its model list, or the key "
    "server did not release it to the cache (revoked, or refused to the cache)",
    "not_in_session": "a renewal asked for a model outside the session's original release",
}

_NONCE_SIZE = 32
_MAX_MESSAGE = 2000


class ErrorKind(StrEnum):
    """What kind of failure a :class:`LocalError` is (the app maps it to an HTTP status)."""

    INVALID = "invalid"  # 400
    UNAUTHENTICATED = "unauthenticated"  # 401
    FORBIDDEN = "forbidden"  # 403
    UNAVAILABLE = "unavailable"  # 503


class LocalError(Error):
    """A local request the cache refuses; ``code`` is the key server's code for the same case."""

    def __init__(
        self, kind: ErrorKind, code: str, message: str, *, reasons: Sequence[str] = ()
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.code = code
        self.reasons = tuple(reasons)


#: Told about every local release/renew outcome: ``(action, decision, reasons, keys released)``.
DecisionObserver = Callable[[str, str, list[str], int], None]


def _ignore(action: str, decision: str, reasons: list[str], keys: int) -> None:
    del action, decision, reasons, keys


@dataclass(frozen=True)
class _Session:
    claims: Claims
    suite: str
    recipient: hpke.HpkePublicKey
    models: tuple[str, ...] | None
    expires_at: datetime


_Grant = tuple[str, tuple[HeldKey, ...]]


class LocalReleaseService:
    """Attested key release to local enclaves from the cache's holdings (see module doc).

    ``holdings`` returns the cache's current snapshot (called once per request, never locked).
    Thread-safe: the app may call it from the event loop and from worker threads.
    """

    def __init__(
        self,
        *,
        holdings: Callable[[], Holdings],
        verifiers: VerifierSet,
        clock: Callable[[], datetime],
        nonce_ttl: timedelta = timedelta(seconds=30),
        session_duration: timedelta = timedelta(minutes=10),
        observer: DecisionObserver | None = None,
        max_nonces: int = 100_000,
        max_sessions: int = 10_000,
    ) -> None:
        self._holdings = holdings
        self._verifiers = verifiers
        self._clock = clock
        self._nonce_ttl = nonce_ttl
        self._session_duration = session_duration
        self._observe: DecisionObserver = observer or _ignore
        self._max_nonces = max_nonces
        self._max_sessions = max_sessions
        self._lock = threading.Lock()
        self._nonces: OrderedDict[bytes, datetime] = OrderedDict()
        self._sessions: dict[bytes, _Session] = {}
        self._evidence_types = tuple(sorted(verifiers.evidence_types))

    @property
    def evidence_types(self) -> tuple[str, ...]:
        return self._evidence_types

    def now(self) -> datetime:
        return self._clock()

    # -- challenge ------------------------------------------------------------------------------

    def challenge(self) -> ChallengeResponse:
        nonce = secrets.token_bytes(_NONCE_SIZE)
        expires_at = self.now() + self._nonce_ttl
        with self._lock:
            if len(self._nonces) >= self._max_nonces:
                self._purge_nonces(self.now())
                while len(self._nonces) >= self._max_nonces:
                    self._nonces.popitem(last=False)  # oldest first: they expire first anyway
            self._nonces[nonce] = expires_at
        return ChallengeResponse(
            nonce=nonce,
            expires_at=expires_at,
            hpke_suites=HPKE_SUITES,
            evidence_types=self._evidence_types,
        )

    def _purge_nonces(self, now: datetime) -> None:
        for stale in [n for n, end in self._nonces.items() if end <= now]:
            del self._nonces[stale]

    def _consume_nonce(self, nonce: bytes, request_id: str) -> None:
        with self._lock:
            expires_at = self._nonces.pop(nonce, None)
        if expires_at is None:
            self._refuse(
                "release",
                request_id,
                ErrorKind.FORBIDDEN,
                "nonce_invalid",
                "the challenge nonce is unknown or was already used; request a new challenge "
                "and attest again",
            )
        if self.now() >= expires_at:
            self._refuse(
                "release",
                request_id,
                ErrorKind.FORBIDDEN,
                "nonce_expired",
                "the challenge nonce expired before the release request; request a new "
                "challenge and attest again promptly",
            )

    # -- release --------------------------------------------------------------------------------

    def release(self, request: ReleaseRequest) -> ReleaseResponse:
        request_id = secrets.token_hex(16)
        self._consume_nonce(request.nonce, request_id)
        suite = request.hpke.suite
        try:
            recipient = hpke.HpkePublicKey.decode(suite, request.hpke.public_key)
        except ProtocolError as exc:
            self._refuse("release", request_id, ErrorKind.INVALID, "invalid_public_key", str(exc))
        now = self.now()
        try:
            evidence = Evidence(type=request.evidence.type, data=request.evidence.data)
            claims = self._verifiers.verify(evidence, now=now)
        except AttestationError as exc:
            code = reason_for_error(exc)
            self._refuse(
                "release", request_id, ErrorKind.FORBIDDEN, code, f"evidence refused: {exc}"
            )
        expected = report_data_for(
            nonce=request.nonce, hpke_suite=suite, public_key=request.hpke.public_key
        )
        if binding_reasons(claims, expected):
            self._refuse(
                "release",
                request_id,
                ErrorKind.FORBIDDEN,
                "binding_mismatch",
                "the evidence's report_data does not bind this request's nonce, HPKE suite and "
                "public key (evidence made for another request, or the key was swapped)",
            )
        holdings = self._holdings()
        grants, denials = self._decide(request.models, claims, now, holdings)
        session: SessionGrant | None = None
        if request.session and grants and self._session_duration > timedelta(0):
            session = self._new_session(claims, suite, recipient, request.models, now)
        granted = self._seal(
            grants,
            suite=suite,
            recipient=recipient,
            request_id=request_id,
            request_nonce=request.nonce,
            cap=_cap(claims),
        )
        self._log_decision("release", request_id, claims, grants, denials, len(granted))
        return ReleaseResponse(
            request_id=request_id,
            server_time=now,
            granted=granted,
            # Asking for "every model" must not reveal the ids of models one may not have.
            denied=tuple(denials) if request.models is not None else (),
            session=session,
        )

    # -- renew ----------------------------------------------------------------------------------

    def _new_session(
        self,
        claims: Claims,
        suite: str,
        recipient: hpke.HpkePublicKey,
        models: tuple[str, ...] | None,
        now: datetime,
    ) -> SessionGrant:
        token = "kcs_" + secrets.token_urlsafe(32)
        expires_at = now + self._session_duration
        cap = _cap(claims)
        if cap is not None:
            expires_at = min(expires_at, cap)
        with self._lock:
            if len(self._sessions) >= self._max_sessions:
                for digest in [d for d, s in self._sessions.items() if s.expires_at <= now]:
                    del self._sessions[digest]
                while len(self._sessions) >= self._max_sessions:
                    del self._sessions[next(iter(self._sessions))]
            self._sessions[_token_digest(token)] = _Session(
                claims=claims,
                suite=suite,
                recipient=recipient,
                models=models,
                expires_at=expires_at,
            )
        return SessionGrant(token=token, expires_at=expires_at)

    def renew(self, token: str, request: RenewRequest) -> ReleaseResponse:
        """Renew with a local session: the *current* holdings and policies, evaluated against
        the claims recorded at release, sealed to the session's key and the fresh nonce."""
        request_id = secrets.token_hex(16)
        now = self.now()
        digest = _token_digest(token)
        with self._lock:
            session = self._sessions.get(digest)
            if session is not None and now >= session.expires_at:
                del self._sessions[digest]
                session = None
        if session is None:
            self._refuse(
                "renew",
                request_id,
                ErrorKind.FORBIDDEN,
                "session_invalid",
                "the session token is unknown or expired (key cache sessions do not survive a "
                "restart); release again with fresh evidence",
            )
        models = request.models
        outside: list[DeniedModel] = []
        if session.models is not None:
            allowed = set(session.models)
            if models is None:
                models = session.models
            else:
                outside = [
                    DeniedModel(
                        model_id=model_id,
                        reasons=("not_in_session",),
                        message=f"model {model_id!r} was not part of this session's release",
                    )
                    for model_id in models
                    if model_id not in allowed
                ]
                models = tuple(m for m in models if m in allowed)
        grants, denials = self._decide(models, session.claims, now, self._holdings())
        denials = outside + denials
        granted = self._seal(
            grants,
            suite=session.suite,
            recipient=session.recipient,
            request_id=request_id,
            request_nonce=request.nonce,
            cap=_cap(session.claims),
        )
        self._log_decision("renew", request_id, session.claims, grants, denials, len(granted))
        return ReleaseResponse(
            request_id=request_id,
            server_time=now,
            granted=granted,
            denied=tuple(denials) if request.models is not None else (),
            session=None,
        )

    # -- decisions ------------------------------------------------------------------------------

    def _decide(
        self,
        models: Sequence[str] | None,
        claims: Claims,
        now: datetime,
        holdings: Holdings,
    ) -> tuple[list[_Grant], list[DeniedModel]]:
        grants: list[_Grant] = []
        denials: list[DeniedModel] = []
        wanted = tuple(models) if models is not None else tuple(sorted(holdings.keys))
        for model_id in wanted:
            versions = holdings.valid(model_id, now)
            if not versions:
                denials.append(_unavailable(model_id, holdings, now))
                continue
            # Every version of a model came in one key server response, under one policy.
            decision = versions[0].policy.evaluate(claims, now=now)
            if decision.allowed:
                grants.append((model_id, versions))
            else:
                denials.append(
                    DeniedModel(
                        model_id=model_id,
                        reasons=decision.reasons,
                        message=decision.message[:_MAX_MESSAGE],
                    )
                )
        return grants, denials

    def _seal(
        self,
        grants: list[_Grant],
        *,
        suite: str,
        recipient: hpke.HpkePublicKey,
        request_id: str,
        request_nonce: bytes,
        cap: datetime | None,
    ) -> tuple[GrantedKey, ...]:
        out: list[GrantedKey] = []
        for model_id, versions in grants:
            for held in versions:
                lease_end = held.expires_at if cap is None else min(held.expires_at, cap)
                info = key_release_info(
                    model_id=model_id,
                    key_version=held.key_version,
                    request_id=request_id,
                    request_nonce=request_nonce,
                    policy_digest=held.policy_digest,
                    lease_expires_at=lease_end,
                )
                out.append(
                    GrantedKey(
                        model_id=model_id,
                        key_version=held.key_version,
                        sealed_key=hpke.seal(suite, recipient, held.key.material, info=info),
                        lease_expires_at=lease_end,
                        policy=dict(held.policy_document),
                        policy_version=held.policy_version,
                        policy_digest=held.policy_digest,
                    )
                )
        return tuple(out)

    # -- logging --------------------------------------------------------------------------------

    def _refuse(
        self, action: str, request_id: str, kind: ErrorKind, code: str, message: str
    ) -> NoReturn:
        _log.info(
            "local %s refused",
            action,
            extra={"request_id": request_id, "code": code},
        )
        self._observe(action, "refuse", [code], 0)
        raise LocalError(kind, code, message, reasons=(code,))

    def _log_decision(
        self,
        action: str,
        request_id: str,
        claims: Claims,
        grants: list[_Grant],
        denials: list[DeniedModel],
        released: int,
    ) -> None:
        decision = "allow" if grants and not denials else "partial" if grants else "deny"
        self._observe(action, decision, [r for d in denials for r in d.reasons], released)
        if _log.isEnabledFor(logging.INFO):
            granted = {m: [k.key_version for k in v] for m, v in grants}
            denied = {d.model_id: list(d.reasons) for d in denials}
            _log.info(
                "local %s %s: granted %s, denied %s",
                action,
                decision,
                ", ".join(f"{m} v{','.join(map(str, v))}" for m, v in granted.items()) or "-",
                ", ".join(f"{m} ({', '.join(r)})" for m, r in denied.items()) or "-",
                extra={
                    "request_id": request_id,
                    "decision": decision,
                    "tee": claims.tee,
                    "measurement": claims.measurement,
                    "evidence_digest": claims.evidence_digest,
                    "granted": granted,
                    "denied": denied,
                },
            )


def _cap(claims: Claims) -> datetime | None:
    """Local leases never outlive the freshness of the collateral that verified the client."""
    if claims.collateral_next_update is not None:
        return claims.collateral_next_update.astimezone(UTC)
    return None


def _token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "replace")).digest()


def _unavailable(model_id: str, holdings: Holdings, now: datetime) -> DeniedModel:
    """Why the cache cannot release ``model_id`` although the client's evidence verified."""
    ended = holdings.expired.get(model_id)
    if ended is None and model_id in holdings.keys:
        ended = max(k.expires_at for k in holdings.keys[model_id])
    if ended is not None and ended <= now:
        return DeniedModel(
            model_id=model_id,
            reasons=("lease_expired",),
            message=f"the key cache's lease on model {model_id!r} ended at "
            f"{ended.astimezone(UTC).isoformat()} and the key server could not be reached to "
            "renew it; retry once the key server is reachable again",
        )
    server = holdings.denied.get(model_id)
    if server is not None:
        if set(server.reasons) <= MODEL_LEVEL_REASONS:
            return DeniedModel(
                model_id=model_id, reasons=server.reasons, message=server.message[:_MAX_MESSAGE]
            )
        return DeniedModel(
            model_id=model_id,
            reasons=("not_cached",),
            message=f"the key server denied model {model_id!r} to this key cache "
            f"({', '.join(server.reasons)}), so the cache cannot release it",
        )
    if holdings.refusal is not None:
        return DeniedModel(
            model_id=model_id,
            reasons=("not_cached",),
            message="the key server refused this key cache's own attestation "
            f"({', '.join(holdings.refusal.reasons)}); it holds and serves no keys until the "
            "key server accepts it (see `sealtorch keycache status`)",
        )
    return DeniedModel(
        model_id=model_id,
        reasons=("not_cached",),
        message=f"this key cache holds no key for model {model_id!r}: it is not in the cache's "
        "model list, or the key server did not release it to the cache (unknown, revoked, or "
        "not allowed)",
    )
