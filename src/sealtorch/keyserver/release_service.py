"""The key release protocol: ``challenge``, ``release`` and ``renew`` (the hot path).

:class:`ReleaseService` knows nothing about HTTP (it never imports the web framework): the
routes translate requests into calls and :class:`ServiceError` into responses. It answers with
the protocol's own records (:mod:`sealtorch.protocol`), built once: the routes serialise them
as they are. Its database work goes through the store's group commit (:meth:`Store.submit`), so
concurrent requests share one transaction and one disk flush.

The release path (``docs/protocol.md``), in order, stopping at the first failure:

1. check the request on its own: the HPKE public key, the evidence (→ claims; ``sim`` evidence
   on the event loop, others in a worker thread) and its report_data binding — no database;
2. in **one** commit (shared with concurrent requests): spend the challenge nonce (its MAC
   and expiry checked first, :mod:`sealtorch.keyserver.nonces`; spent exactly once across
   replicas; a forged, expired or spent nonce refuses the request whatever step 1 found, as if
   it had been checked first), read each requested model's current policy and
   active keys (share-locked until the commit, so a revocation committed before it wins),
   evaluate, create the renewal session if asked, append the audit record — the commit is the
   point of no return, and if it fails nothing is released (fail closed);
3. only then unwrap each data key with the master key, HPKE-seal it to the enclave's key, with
   ``key_release_info`` binding model, version, request, nonce, policy and lease, and sign its
   release statement (:mod:`sealtorch.protocol.statement`) with the release-signing key — so
   nothing is ever signed for a refused key or before its audit record committed.

Refused requests are audited in the same commit (a valid nonce is spent as well). The steps
and codes shared with the key cache are in :mod:`sealtorch._release`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NoReturn, TypeVar

from sealtorch._crypto import hpke
from sealtorch._release import (
    INLINE_EVIDENCE,
    NONCE_EXPIRED,
    NONCE_INVALID,
    CheckedRequest,
    DecisionObserver,
    ErrorKind,
    OutcomeReporter,
    Refusal,
    check_release_request,
    collateral_cap,
    decision_name,
    new_challenge,
    policy_denial,
    release_response,
    seal_key,
    session_models,
)
from sealtorch.attestation import Claims, Policy, VerifierSet
from sealtorch.errors import (
    AttestationError,
    ConfigError,
    IntegrityError,
    ProtocolError,
    StorageError,
)
from sealtorch.keyserver._service import (
    AuditContext,
    Clock,
    Offload,
    PolicyCache,
    ServiceError,
    rfc3339,
    unavailable,
)
from sealtorch.keyserver.masterkey import MasterKey, wrap_aad
from sealtorch.keyserver.nonces import load_nonce_key
from sealtorch.keyserver.records import PolicyRecord, ReleaseMaterial, SpentNonce, WrappedKey
from sealtorch.keyserver.settings import KeyServerSettings
from sealtorch.keyserver.signingkey import ReleaseSigningKey
from sealtorch.keyserver.store import GroupTransaction, Store
from sealtorch.keyserver.tokens import (
    InvalidTokenError,
    TokenKind,
    authenticate_session,
    issue_token,
)
from sealtorch.protocol import (
    ChallengeResponse,
    DeniedModel,
    GrantedKey,
    ReleaseRequest,
    ReleaseResponse,
    RenewRequest,
    SessionGrant,
    issue_statement,
)
from sealtorch.protocol.audit import AuditEntry, canonical_json

__all__ = ["ReleaseService"]

_log = logging.getLogger("sealtorch.keyserver.service")

_T = TypeVar("_T")


@dataclass(frozen=True)
class _Grant:
    material: ReleaseMaterial
    policy: Policy
    policy_record: PolicyRecord
    keys: tuple[WrappedKey, ...]


@dataclass(frozen=True, slots=True)
class _Checked:
    """What a release request's own checks found (before the database is involved), with the
    claims as the audit record stores them."""

    request: CheckedRequest
    claims_dict: dict[str, Any] | None = None


@dataclass(frozen=True)
class _Decided:
    grants: list[_Grant]
    denials: list[DeniedModel]
    lease_end: datetime
    session: SessionGrant | None


def _refusal_entry(context: AuditContext, refusal: Refusal) -> AuditEntry:
    return context.entry("refuse", reasons=(refusal.code,))


def _refusal(tx: GroupTransaction, context: AuditContext, refusal: Refusal) -> Refusal:
    """Audit a refused request in its commit; :meth:`ReleaseService._refused` raises afterwards."""
    tx.append_audit(_refusal_entry(context, refusal))
    return refusal


def _no_active_key(model_id: str) -> DeniedModel:
    return DeniedModel(
        model_id=model_id,
        reasons=("no_active_key",),
        message=f"model {model_id!r} has no active (unrevoked) key version",
    )


class ReleaseService:
    """Attested key release over a :class:`Store` (see the module docstring)."""

    def __init__(
        self,
        settings: KeyServerSettings,
        *,
        store: Store,
        master_key: MasterKey,
        signing_key: ReleaseSigningKey,
        verifiers: VerifierSet,
        clock: Clock,
        policies: PolicyCache,
        observer: DecisionObserver | None = None,
        offload: Offload | None = None,
        simulated_observer: Callable[[str], None] | None = None,
    ) -> None:
        self._settings = settings
        self._simulated_observer = simulated_observer
        self._offload: Offload = offload or asyncio.to_thread
        self._report = OutcomeReporter(_log, observer, error=ServiceError)
        self._store = store
        self._master = master_key
        self._signer = signing_key
        # Sealing and signing run on the event loop when both keys are in-process
        # (microseconds), in a worker thread when either is in a PKCS#11 token.
        self._seal_inline = master_key.in_process and signing_key.in_process
        self._verifiers = verifiers
        self.now: Callable[[], datetime] = clock.now
        self._policies = policies
        self._evidence_types = tuple(sorted(verifiers.evidence_types))
        self._nonces = load_nonce_key(store.nonce_key, master_key)

    @property
    def evidence_types(self) -> tuple[str, ...]:
        """The evidence types this service verifies, sorted (``sim``: development only)."""
        return self._evidence_types

    # -- challenge ------------------------------------------------------------------------------

    async def challenge(self) -> ChallengeResponse:
        """A fresh nonce; no database work (:mod:`sealtorch.keyserver.nonces`)."""
        nonce, expires_at = self._nonces.issue(now=self.now(), ttl=self._settings.nonce_ttl)
        return new_challenge(nonce, expires_at=expires_at, evidence_types=self._evidence_types)

    # -- release --------------------------------------------------------------------------------

    async def release(
        self, request: ReleaseRequest, *, client_address: str | None
    ) -> ReleaseResponse:
        """Verify, then consume the nonce, decide and audit in one commit, then seal (see the
        module docstring). A release on simulated-TEE evidence is logged at WARNING and
        reported to ``simulated_observer``, whatever its decision: a refusal here, a decision
        in its decision line (one line per request, not two: the release path is hot)."""
        if request.evidence.type != "sim":
            return await self._release(request, client_address=client_address)
        try:
            return await self._release(request, client_address=client_address)
        except ServiceError as exc:
            _log.warning(
                "INSECURE: release decided on simulated-TEE evidence: refuse (%s)", exc.code
            )
            if self._simulated_observer is not None:
                self._simulated_observer("refuse")
            raise

    async def _release(
        self, request: ReleaseRequest, *, client_address: str | None
    ) -> ReleaseResponse:
        request_id = secrets.token_hex(16)
        context = AuditContext(
            action="release",
            request_id=request_id,
            client_address=client_address,
            evidence_digest=hashlib.sha256(request.evidence.data).hexdigest(),
            model_ids=tuple(request.models) if request.models is not None else (),
        )
        now = self.now()
        if request.evidence.type in INLINE_EVIDENCE:
            checked = self._check_release(request, now)
        else:
            checked = await self._offload(self._check_release, request, now)

        expires_at = self._nonces.expiry(request.nonce)
        nonce = None if expires_at is None else SpentNonce(request.nonce, expires_at)

        def decide(tx: GroupTransaction) -> _Decided | Refusal:
            if nonce is None:
                return _refusal(tx, context, NONCE_INVALID)
            if self.now() >= nonce.expires_at:
                return _refusal(tx, context, NONCE_EXPIRED)
            if not tx.spend_nonce(nonce):
                return _refusal(tx, context, NONCE_INVALID)
            if checked.claims_dict is not None:
                context.claims = checked.claims_dict
            if checked.request.refusal is not None:
                return _refusal(tx, context, checked.request.refusal)
            _, claims = checked.request.accepted()
            lease_end = collateral_cap(now + self._settings.lease_duration, claims)
            grants, denials = self._decide(tx.release_material(request.models), claims, now)
            session: SessionGrant | None = None
            session_id: str | None = None
            if request.session and grants and self._settings.session_duration > timedelta(0):
                issued = issue_token(TokenKind.SESSION)
                session_id = issued.token_id
                session_end = collateral_cap(now + self._settings.session_duration, claims)
                tx.create_session(
                    token_id=issued.token_id,
                    digest=issued.digest,
                    hpke_suite=request.hpke.suite,
                    public_key=request.hpke.public_key,
                    # Canonicalised here, not up front: most releases open no session.
                    claims_json=canonical_json(checked.claims_dict),
                    evidence_digest=context.evidence_digest,
                    model_ids=request.models,
                    expires_at=session_end,
                )
                session = SessionGrant(token=issued.token, expires_at=session_end)
            tx.append_audit(
                self._decision_entry(
                    context,
                    grants,
                    denials,
                    lease_end=lease_end,
                    suite=request.hpke.suite,
                    session_id=session_id,
                )
            )
            return _Decided(grants, denials, lease_end, session)

        outcome = await self._commit(decide, nonce=nonce)
        if isinstance(outcome, Refusal):
            self._refused(context, outcome)
        recipient, _ = checked.request.accepted()
        granted = await self._sealed(
            outcome.grants,
            suite=request.hpke.suite,
            recipient=recipient,
            public_key=request.hpke.public_key,
            request_id=request_id,
            request_nonce=request.nonce,
            lease_end=outcome.lease_end,
            issued_at=now,
        )
        self._log_decision(
            "release",
            request_id,
            outcome.grants,
            outcome.denials,
            len(granted),
            simulated=request.evidence.type == "sim",
        )
        return release_response(
            request_id=request_id,
            server_time=now,
            granted=granted,
            denials=outcome.denials,
            requested=request.models,
            session=outcome.session,
        )

    def _check_release(self, request: ReleaseRequest, now: datetime) -> _Checked:
        """The request's own checks (no database): public key, evidence, binding."""
        checked = check_release_request(request, self._verifiers, now=now)
        if checked.claims is None:
            return _Checked(checked)
        return _Checked(checked, checked.claims.to_dict())

    async def renew(
        self, token: str, request: RenewRequest, *, client_address: str | None
    ) -> ReleaseResponse:
        """Renew leases for a session: current policies against the session's recorded claims,
        sealed to the session's public key, bound to the request's fresh nonce."""
        now = self.now()
        request_id = secrets.token_hex(16)
        try:
            session = await self._offload(authenticate_session, self._store, token, now=now)
        except InvalidTokenError as exc:
            _log.info("renewal refused: %s session token", exc.reason)
            refused = AuditContext(
                action="renew",
                request_id=request_id,
                client_address=client_address,
                evidence_digest=None,
                model_ids=tuple(request.models or ()),
            )
            refusal = Refusal(ErrorKind.FORBIDDEN, "session_invalid", str(exc))
            try:  # best effort: refused either way
                await self._commit(lambda tx: tx.append_audit(_refusal_entry(refused, refusal)))
            except ServiceError:
                _log.error("could not audit a refused renew request")
            self._refused(refused, refusal)
        except StorageError as exc:
            raise unavailable(exc) from exc
        try:
            claims = Claims.from_dict(session.claims())
            recipient = hpke.HpkePublicKey.decode(session.hpke_suite, session.public_key)
        except (AttestationError, ProtocolError) as exc:  # pragma: no cover - we stored them
            raise ServiceError(
                ErrorKind.UNAVAILABLE, "session_corrupt", "the stored session is unusable"
            ) from exc
        models, outside = session_models(request.models, session.model_ids)
        context = AuditContext(
            action="renew",
            request_id=request_id,
            client_address=client_address,
            evidence_digest=session.evidence_digest,
            model_ids=tuple(request.models or ()),
            actor=session.token_id,
            claims=claims.to_dict(),
        )
        lease_end = collateral_cap(now + self._settings.lease_duration, claims)

        def decide(tx: GroupTransaction) -> _Decided:
            grants, denials = self._decide(tx.release_material(models), claims, now)
            denials = outside + denials
            tx.append_audit(
                self._decision_entry(
                    context,
                    grants,
                    denials,
                    lease_end=lease_end,
                    suite=session.hpke_suite,
                    session_id=session.token_id,
                )
            )
            return _Decided(grants, denials, lease_end, None)

        outcome = await self._commit(decide)
        granted = await self._sealed(
            outcome.grants,
            suite=session.hpke_suite,
            recipient=recipient,
            public_key=session.public_key,
            request_id=request_id,
            request_nonce=request.nonce,
            lease_end=lease_end,
            issued_at=now,
        )
        self._log_decision(
            "renew",
            request_id,
            outcome.grants,
            outcome.denials,
            len(granted),
            simulated=False,  # warned at its release
        )
        return release_response(
            request_id=request_id,
            server_time=now,
            granted=granted,
            denials=outcome.denials,
            requested=request.models,
        )

    # -- release helpers ------------------------------------------------------------------------

    async def _commit(
        self,
        work: Callable[[GroupTransaction], _T],
        *,
        nonce: SpentNonce | None = None,
    ) -> _T:
        """Run ``work`` in the store's next group commit; storage failures become 503s.

        A unit still waiting for the database after the busy timeout is withdrawn (it never
        runs) and the request gets ``store_unavailable``; one already running is waited for.
        """
        try:
            future = self._store.submit(work, nonce=nonce)
        except StorageError as exc:
            raise unavailable(exc) from exc
        # One timer instead of wait_for(shield(...)) (three futures and their callbacks per
        # commit, twice per release): at the busy timeout a unit that has not started is
        # withdrawn; one already running is waited for.
        withdrawn = False

        def give_up() -> None:
            nonlocal withdrawn
            withdrawn = future.cancel()

        timer = asyncio.get_running_loop().call_later(self._settings.busy_timeout, give_up)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if not withdrawn:
                raise
            _log.error("the key store did not take a request within the busy timeout")
            raise ServiceError(
                ErrorKind.UNAVAILABLE, "store_unavailable", "the key store is busy; retry later"
            ) from None
        except StorageError as exc:
            raise unavailable(exc) from exc
        finally:
            timer.cancel()

    def _decide(
        self, material: Sequence[ReleaseMaterial], claims: Claims, now: datetime
    ) -> tuple[list[_Grant], list[DeniedModel]]:
        grants: list[_Grant] = []
        denials: list[DeniedModel] = []
        for item in material:
            if item.model is None:
                denials.append(
                    DeniedModel(
                        model_id=item.model_id,
                        reasons=("unknown_model",),
                        message=f"model {item.model_id!r} does not exist on this key server",
                    )
                )
                continue
            if item.policy is None:
                denials.append(
                    DeniedModel(
                        model_id=item.model_id,
                        reasons=("no_policy",),
                        message=f"model {item.model_id!r} has no release policy yet "
                        "(`sealtorch admin policy set`)",
                    )
                )
                continue
            if not item.keys:
                denials.append(_no_active_key(item.model_id))
                continue
            try:
                policy = self._policies.get(item.policy)
            except ConfigError:
                _log.error("stored policy of %s is invalid; denying", item.model_id)
                denials.append(
                    DeniedModel(
                        model_id=item.model_id,
                        reasons=("policy_invalid",),
                        message="the model's stored policy is invalid; set it again",
                    )
                )
                continue
            decision = policy.evaluate(claims, now=now)
            if decision.allowed:
                grants.append(_Grant(item, policy, item.policy, item.keys))
            else:
                denials.append(policy_denial(item.model_id, decision))
        return grants, denials

    def _decision_entry(
        self,
        context: AuditContext,
        grants: list[_Grant],
        denials: list[DeniedModel],
        *,
        lease_end: datetime,
        suite: str,
        session_id: str | None,
    ) -> AuditEntry:
        decision = decision_name(granted=bool(grants), denied=bool(denials))
        reasons = sorted({reason for denial in denials for reason in denial.reasons})
        details = {
            "granted": [
                {
                    "model_id": g.material.model_id,
                    "key_versions": [k.version for k in g.keys],
                    "policy_version": g.policy_record.version,
                    "policy_digest": g.policy.digest,
                }
                for g in grants
            ],
            "denied": [{"model_id": d.model_id, "reasons": list(d.reasons)} for d in denials],
            "hpke_suite": suite,
            "lease_expires_at": rfc3339(lease_end),
            "session": session_id,
        }
        models = context.model_ids or tuple(
            [g.material.model_id for g in grants] + [d.model_id for d in denials]
        )
        return context.entry(decision, reasons=reasons, model_ids=models, details=details)

    def _seal(
        self,
        grants: list[_Grant],
        *,
        suite: str,
        recipient: hpke.HpkePublicKey,
        public_key: bytes,
        request_id: str,
        request_nonce: bytes,
        lease_end: datetime,
        issued_at: datetime,
    ) -> tuple[GrantedKey, ...]:
        granted: list[GrantedKey] = []
        for grant in grants:
            model_id = grant.material.model_id
            document = grant.policy.to_dict()
            for key in grant.keys:
                try:
                    dek = self._master.unwrap(key.blob, wrap_aad(model_id, key.version))
                except (IntegrityError, StorageError) as exc:
                    _log.error("cannot unwrap key version %d of %s: %s", key.version, model_id, exc)
                    raise ServiceError(
                        ErrorKind.UNAVAILABLE,
                        "key_unavailable",
                        "a data key could not be unwrapped by the master key; the operator "
                        "must check the master key configuration",
                    ) from exc
                try:
                    statement = issue_statement(
                        self._signer,
                        model_id=model_id,
                        key_version=key.version,
                        key=dek.material,
                        policy_digest=grant.policy.digest,
                        lease_expires_at=lease_end,
                        hpke_suite=suite,
                        hpke_public_key=public_key,
                        request_id=request_id,
                        issued_at=issued_at,
                    )
                except StorageError as exc:
                    _log.error("cannot sign the release statement of %s: %s", model_id, exc)
                    raise ServiceError(
                        ErrorKind.UNAVAILABLE,
                        "signing_unavailable",
                        "the release-signing key could not sign; the operator must check the "
                        "signing key configuration",
                    ) from exc
                granted.append(
                    seal_key(
                        dek.material,
                        suite=suite,
                        recipient=recipient,
                        model_id=model_id,
                        key_version=key.version,
                        request_id=request_id,
                        request_nonce=request_nonce,
                        policy=document,
                        policy_version=grant.policy_record.version,
                        policy_digest=grant.policy.digest,
                        lease_expires_at=lease_end,
                        statement=statement,
                    )
                )
                del dek
        return tuple(granted)

    async def _sealed(self, grants: list[_Grant], **options: Any) -> tuple[GrantedKey, ...]:
        """:meth:`_seal`, on the event loop for in-process master and signing keys
        (microseconds), in a worker thread when either is in a PKCS#11 token."""
        if not grants:
            return ()
        if self._seal_inline:
            return self._seal(grants, **options)
        sealed: tuple[GrantedKey, ...] = await self._offload(self._seal, grants, **options)
        return sealed

    def _refused(self, context: AuditContext, refusal: Refusal) -> NoReturn:
        """Log and count a refused request (audited in its commit), then raise."""
        self._report.refuse(context.action, context.request_id, refusal)

    def _log_decision(
        self,
        action: str,
        request_id: str,
        grants: list[_Grant],
        denials: list[DeniedModel],
        released: int,
        *,
        simulated: bool,
    ) -> None:
        """Count and log one decision; one on simulated-TEE evidence is a WARNING (whatever
        the verbosity) and reported to ``simulated_observer``."""
        decision = self._report.decided(
            action, granted=bool(grants), denials=denials, released=released
        )
        if simulated and self._simulated_observer is not None:
            self._simulated_observer(decision)
        level = logging.WARNING if simulated else logging.INFO
        if _log.isEnabledFor(level):
            _log.log(
                level,
                "INSECURE: %s decided on simulated-TEE evidence: %s (%s)"
                if simulated
                else "%s decided",
                *((action, decision, request_id) if simulated else (action,)),
                extra={
                    "request_id": request_id,
                    "granted": [g.material.model_id for g in grants],
                    "denied": {d.model_id: list(d.reasons) for d in denials},
                },
            )
