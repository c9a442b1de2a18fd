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
   id, nonce, policy digest, lease) and the *remaining* lease of the cache's own key, next to
   the key server's signed release statement about that key (forwarded as received, so the
   client checks the key's origin itself).

Every decision is logged (structured, without secrets) and reported to an observer (metrics).
The steps and codes shared with the key server are in :mod:`sealtorch._release`.
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

from sealtorch._crypto import hpke
from sealtorch._release import (
    MAX_DENIAL_MESSAGE,
    NONCE_EXPIRED,
    NONCE_INVALID,
    NONCE_SIZE,
    DecisionObserver,
    ErrorKind,
    OutcomeReporter,
    Refusal,
    RequestError,
    check_release_request,
    collateral_cap,
    new_challenge,
    policy_denial,
    release_response,
    seal_key,
    session_models,
)
from sealtorch.attestation import Claims, VerifierSet
from sealtorch.keycache.holdings import MODEL_LEVEL_REASONS, HeldKey, Holdings
from sealtorch.protocol import (
    ChallengeResponse,
    DeniedModel,
    GrantedKey,
    ReleaseRequest,
    ReleaseResponse,
    RenewRequest,
    SessionGrant,
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


class LocalError(RequestError):
    """A local request the cache refuses; ``code`` is the key server's code for the same case.

    ``kind`` is an :class:`ErrorKind` (the app maps it to an HTTP status).
    """


@dataclass(frozen=True)
class _Session:
    claims: Claims
    suite: str
    recipient: hpke.HpkePublicKey
    models: tuple[str, ...] | None
    expires_at: datetime


_Grant = tuple[str, tuple[HeldKey, ...]]


_SESSION_INVALID = Refusal(
    ErrorKind.FORBIDDEN,
    "session_invalid",
    "the session token is unknown or expired (key cache sessions do not survive a restart); "
    "release again with fresh evidence",
)


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
        simulated_observer: Callable[[str], None] | None = None,
    ) -> None:
        self._holdings = holdings
        self._simulated_observer = simulated_observer
        self._verifiers = verifiers
        self._clock = clock
        self._nonce_ttl = nonce_ttl
        self._session_duration = session_duration
        self._report = OutcomeReporter(_log, observer, error=LocalError, label="local ")
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
        challenge = new_challenge(
            secrets.token_bytes(NONCE_SIZE),
            expires_at=self.now() + self._nonce_ttl,
            evidence_types=self._evidence_types,
        )
        with self._lock:
            if len(self._nonces) >= self._max_nonces:
                self._purge_nonces(self.now())
                while len(self._nonces) >= self._max_nonces:
                    self._nonces.popitem(last=False)  # oldest first: they expire first anyway
            self._nonces[challenge.nonce] = challenge.expires_at
        return challenge

    def _purge_nonces(self, now: datetime) -> None:
        for stale in [n for n, end in self._nonces.items() if end <= now]:
            del self._nonces[stale]

    def _consume_nonce(self, nonce: bytes, request_id: str) -> None:
        with self._lock:
            expires_at = self._nonces.pop(nonce, None)
        if expires_at is None:
            self._report.refuse("release", request_id, NONCE_INVALID)
        if self.now() >= expires_at:
            self._report.refuse("release", request_id, NONCE_EXPIRED)

    @property
    def simulated_tee(self) -> bool:
        """Whether simulated-TEE evidence of local enclaves is verified (development only)."""
        return "sim" in self._verifiers.evidence_types

    # -- release --------------------------------------------------------------------------------

    def release(self, request: ReleaseRequest) -> ReleaseResponse:
        """A local release; one on simulated-TEE evidence is logged at WARNING and reported
        to ``simulated_observer``, whatever its decision (as the key server does): a refusal
        here, a decision in its own decision line (one line per request, not two)."""
        if request.evidence.type != "sim":
            return self._release(request)
        try:
            return self._release(request)
        except LocalError as exc:
            self._simulated_refusal(exc.code)
            raise

    def _simulated_refusal(self, code: str) -> None:
        _log.warning("INSECURE: local release decided on simulated-TEE evidence: refuse (%s)", code)
        if self._simulated_observer is not None:
            self._simulated_observer("refuse")

    def _release(self, request: ReleaseRequest) -> ReleaseResponse:
        request_id = secrets.token_hex(16)
        self._consume_nonce(request.nonce, request_id)
        now = self.now()
        checked = check_release_request(request, self._verifiers, now=now)
        if checked.refusal is not None:
            self._report.refuse("release", request_id, checked.refusal)
        recipient, claims = checked.accepted()
        suite = request.hpke.suite
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
            claims=claims,
        )
        self._log_decision("release", request_id, claims, grants, denials, len(granted))
        return release_response(
            request_id=request_id,
            server_time=now,
            granted=granted,
            denials=denials,
            requested=request.models,
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
        expires_at = collateral_cap(now + self._session_duration, claims)
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
            self._report.refuse("renew", request_id, _SESSION_INVALID)
        models, outside = session_models(request.models, session.models)
        grants, denials = self._decide(models, session.claims, now, self._holdings())
        denials = outside + denials
        granted = self._seal(
            grants,
            suite=session.suite,
            recipient=session.recipient,
            request_id=request_id,
            request_nonce=request.nonce,
            claims=session.claims,
        )
        self._log_decision("renew", request_id, session.claims, grants, denials, len(granted))
        return release_response(
            request_id=request_id,
            server_time=now,
            granted=granted,
            denials=denials,
            requested=request.models,
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
                denials.append(policy_denial(model_id, decision))
        return grants, denials

    def _seal(
        self,
        grants: list[_Grant],
        *,
        suite: str,
        recipient: hpke.HpkePublicKey,
        request_id: str,
        request_nonce: bytes,
        claims: Claims,
    ) -> tuple[GrantedKey, ...]:
        """Each granted version, with the *remaining* lease of the cache's own key (never past
        the freshness of the collateral that verified the client)."""
        return tuple(
            seal_key(
                held.key.material,
                suite=suite,
                recipient=recipient,
                model_id=model_id,
                key_version=held.key_version,
                request_id=request_id,
                request_nonce=request_nonce,
                policy=dict(held.policy_document),
                policy_version=held.policy_version,
                policy_digest=held.policy_digest,
                lease_expires_at=collateral_cap(held.expires_at, claims),
                statement=held.statement,
            )
            for model_id, versions in grants
            for held in versions
        )

    # -- logging --------------------------------------------------------------------------------

    def _log_decision(
        self,
        action: str,
        request_id: str,
        claims: Claims,
        grants: list[_Grant],
        denials: list[DeniedModel],
        released: int,
    ) -> None:
        decision = self._report.decided(
            action, granted=bool(grants), denials=denials, released=released
        )
        # A release decided on simulated-TEE evidence is a WARNING (whatever the verbosity),
        # written into this one line rather than a second one: the release path is hot.
        simulated = action == "release" and claims.tee == "sim"
        if simulated and self._simulated_observer is not None:
            self._simulated_observer(decision)
        level = logging.WARNING if simulated else logging.INFO
        if _log.isEnabledFor(level):
            granted = {m: [k.key_version for k in v] for m, v in grants}
            denied = {d.model_id: list(d.reasons) for d in denials}
            _log.log(
                level,
                _SIMULATED_DECISION if simulated else _DECISION,
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


_DECISION = "local %s %s: granted %s, denied %s"
_SIMULATED_DECISION = (
    "INSECURE: local %s decided on simulated-TEE evidence: %s; granted %s, denied %s"
)


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
                model_id=model_id,
                reasons=server.reasons,
                message=server.message[:MAX_DENIAL_MESSAGE],
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
