"""The key server's logic: attested key release, renewal, and the admin operations.

:class:`KeyService` knows nothing about HTTP (it never imports the web framework): the routes
translate requests into calls and :class:`ServiceError` into responses. The key release
protocol (``challenge``, ``release``, ``renew``) is asynchronous: its database work goes through
the store's group commit (:meth:`Store.submit`), so concurrent requests share one transaction
and one disk flush; the other methods are synchronous and thread-safe (the app runs them in a
thread pool).

The release path (``docs/protocol.md``), in order, stopping at the first failure:

1. check the request on its own: the HPKE public key, the evidence (→ claims; ``sim`` evidence
   on the event loop, others in a worker thread) and its report_data binding — no database;
2. in **one** commit (shared with concurrent requests): consume the challenge nonce (exactly
   once across replicas; an unknown or expired nonce refuses the request whatever step 1
   found, as if it had been checked first), read each requested model's current policy and
   active keys (share-locked until the commit, so a revocation committed before it wins),
   evaluate, create the renewal session if asked, append the audit record — the commit is the
   point of no return, and if it fails nothing is released (fail closed);
3. only then unwrap each data key with the master key, HPKE-seal it to the enclave's key, with
   ``key_release_info`` binding model, version, request, nonce, policy and lease, and sign its
   release statement (:mod:`sealtorch.protocol.statement`) with the release-signing key — so
   nothing is ever signed for a refused key or before its audit record committed.

Refused requests are audited in the same commit (their nonce is consumed as well). The steps
and codes shared with the key cache are in :mod:`sealtorch._release`.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import secrets
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, Protocol, TypeVar

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
    RequestError,
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
from sealtorch.attestation.policy import INSECURE_FLAGS
from sealtorch.errors import (
    AttestationError,
    AuditError,
    ConfigError,
    Error,
    IntegrityError,
    ProtocolError,
    StorageError,
)
from sealtorch.keys import DataKey, generate_key
from sealtorch.keyserver.masterkey import FileMasterKey, MasterKey, wrap_aad
from sealtorch.keyserver.records import (
    AdminTokenRecord,
    ConflictError,
    KeyVersionRecord,
    ModelRecord,
    NonceStatus,
    NotFoundError,
    PolicyRecord,
    ReleaseMaterial,
    WrapFunction,
    WrappedDek,
    WrappedKey,
)
from sealtorch.keyserver.settings import KeyServerSettings
from sealtorch.keyserver.signingkey import ReleaseSigningKey
from sealtorch.keyserver.store import GroupTransaction, Store
from sealtorch.keyserver.tokens import (
    InvalidTokenError,
    TokenKind,
    authenticate_admin,
    authenticate_session,
    issue_token,
)
from sealtorch.protocol import (
    ChallengeResponse,
    DeniedModel,
    GrantedKey,
    ReleasePublicKey,
    ReleaseRequest,
    ReleaseResponse,
    RenewRequest,
    SessionGrant,
    issue_statement,
)
from sealtorch.protocol.admin import (
    ADMIN_SCOPES,
    AdminScope,
    AuditHeadInfo,
    AuditPage,
    CreatedModel,
    CreatedToken,
    KeyBlockWire,
    KeyVersionInfo,
    ModelDetail,
    ModelInfo,
    PolicyInfo,
    RewrapRequest,
    TokenInfo,
    WrapRequest,
)
from sealtorch.protocol.audit import AuditEntry, AuditKind, canonical_json
from sealtorch.protocol.checkpoint import SignedCheckpoint, issue_checkpoint

__all__ = [
    "Actor",
    "DecisionObserver",
    "ErrorKind",
    "KeyService",
    "ServiceError",
]

_log = logging.getLogger(__name__)

_POLICY_CACHE_SIZE = 512
_MAX_AUDIT_PAGE = 1000

_T = TypeVar("_T")


class ServiceError(RequestError):
    """A request the service refuses or cannot serve; ``code`` is stable (``docs/protocol.md``).

    ``kind`` is an :class:`ErrorKind` (the routes map it to an HTTP status).
    """


@dataclass(frozen=True)
class Actor:
    """Who calls an admin operation (an authenticated admin token) and from where, with what
    that token may do (no scopes: nothing) and when it expires."""

    token_id: str
    client_address: str | None = None
    name: str = ""
    scopes: frozenset[AdminScope] = frozenset()
    expires_at: datetime | None = None


@dataclass(frozen=True)
class _Grant:
    material: ReleaseMaterial
    policy: Policy
    policy_record: PolicyRecord
    keys: tuple[WrappedKey, ...]


class Offload(Protocol):
    """Runs blocking work off the event loop: ``await offload(function, *args, **kwargs)``."""

    def __call__(
        self, function: Callable[..., _T], /, *args: Any, **kwargs: Any
    ) -> Awaitable[_T]: ...


@dataclass(frozen=True, slots=True)
class _Checked:
    """What a release request's own checks found (before the database is involved), with the
    claims as the audit record and a session store them."""

    request: CheckedRequest
    claims_dict: dict[str, Any] | None = None
    claims_json: str = ""


@dataclass(frozen=True)
class _Decided:
    grants: list[_Grant]
    denials: list[DeniedModel]
    lease_end: datetime
    session: SessionGrant | None


def _refusal_entry(context: dict[str, Any], refusal: Refusal) -> AuditEntry:
    return AuditEntry(
        kind=context["kind"],
        action=context["action"],
        decision="refuse",
        actor=context.get("actor"),
        client_address=context["client_address"],
        request_id=context["request_id"],
        evidence_digest=context["evidence_digest"],
        claims=context.get("claims"),
        model_ids=context["model_ids"],
        reasons=(refusal.code,),
    )


def _refusal(tx: GroupTransaction, context: dict[str, Any], refusal: Refusal) -> Refusal:
    """Audit a refused request in its commit; :meth:`KeyService._refused` raises afterwards."""
    tx.append_audit(_refusal_entry(context, refusal))
    return refusal


def _system_clock() -> datetime:
    return datetime.now(UTC)


def _model_info(model: ModelRecord, current: int | None, policy: int | None) -> ModelInfo:
    return ModelInfo(
        model_id=model.model_id,
        created_at=model.created_at,
        current_key_version=current,
        policy_version=policy,
    )


def _key_info(record: KeyVersionRecord) -> KeyVersionInfo:
    return KeyVersionInfo(
        model_id=record.model_id,
        version=record.version,
        state=record.state.value,
        fingerprint=record.fingerprint,
        wrap_key_id=record.wrap_key_id,
        created_at=record.created_at,
        revoked_at=record.revoked_at,
    )


def _scope_list(scopes: frozenset[AdminScope]) -> list[str]:
    """Scope names in documented order."""
    return [scope.value for scope in ADMIN_SCOPES if scope in scopes]


def _token_info(record: AdminTokenRecord) -> TokenInfo:
    return TokenInfo(
        token_id=record.token_id,
        name=record.name,
        scopes=tuple(_scope_list(record.scopes)),
        created_at=record.created_at,
        expires_at=record.expires_at,
        revoked_at=record.revoked_at,
    )


def canonical_policy(policy: Policy) -> str:
    """The stored text of a policy: canonical JSON of its normalised form (digest = SHA-256)."""
    return json.dumps(policy.to_dict(), sort_keys=True, separators=(",", ":"))


class KeyService:
    """Attested key release and key administration over a :class:`Store` (see module doc)."""

    def __init__(
        self,
        settings: KeyServerSettings,
        *,
        store: Store,
        master_key: MasterKey,
        signing_key: ReleaseSigningKey,
        verifiers: VerifierSet,
        clock: Callable[[], datetime] | None = None,
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
        self._seal_inline = isinstance(master_key, FileMasterKey) and signing_key.in_process
        self._verifiers = verifiers
        self._clock = clock or _system_clock
        self._policies: dict[str, Policy] = {}
        self._policy_lock = threading.Lock()
        self._evidence_types = tuple(sorted(verifiers.evidence_types))

    @property
    def store(self) -> Store:
        return self._store

    @property
    def simulated_tee(self) -> bool:
        """Whether simulated-TEE evidence is verified (sim keys trusted): development only."""
        return "sim" in self._evidence_types

    @property
    def release_public_key(self) -> ReleasePublicKey:
        """The public key of the key that signs release statements (enclaves pin it)."""
        return self._signer.public_key

    def now(self) -> datetime:
        value = self._clock()
        if value.tzinfo is None:
            raise ConfigError("the key server clock must return timezone-aware times")
        return value.astimezone(UTC)

    # -- health ---------------------------------------------------------------------------------

    def check_ready(self) -> None:
        """Raise :class:`ServiceError` (unavailable) unless the store answers with our schema."""
        try:
            self._store.ping()
            self._store.check_schema()
        except StorageError as exc:
            raise ServiceError(ErrorKind.UNAVAILABLE, "store_unavailable", str(exc)) from exc

    def purge_expired(self) -> int:
        return self._store.purge_expired(now=self.now())

    # -- challenge ------------------------------------------------------------------------------

    async def challenge(self) -> ChallengeResponse:
        challenge = new_challenge(
            now=self.now(), ttl=self._settings.nonce_ttl, evidence_types=self._evidence_types
        )

        def issue(tx: GroupTransaction) -> None:
            tx.add_nonce(challenge.nonce, expires_at=challenge.expires_at)

        # Not durable: a nonce lost in a power cut only makes its client ask again.
        await self._commit(issue, durable=False)
        return challenge

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
        context: dict[str, Any] = {
            "kind": AuditKind.RELEASE,
            "action": "release",
            "client_address": client_address,
            "request_id": request_id,
            "evidence_digest": hashlib.sha256(request.evidence.data).hexdigest(),
            "model_ids": tuple(request.models) if request.models is not None else (),
        }
        now = self.now()
        if request.evidence.type in INLINE_EVIDENCE:
            checked = self._check_release(request, now)
        else:
            checked = await self._offload(self._check_release, request, now)

        def decide(tx: GroupTransaction) -> _Decided | Refusal:
            status = tx.consume_nonce(request.nonce, now=self.now())
            if status is NonceStatus.UNKNOWN:
                return _refusal(tx, context, NONCE_INVALID)
            if status is NonceStatus.EXPIRED:
                return _refusal(tx, context, NONCE_EXPIRED)
            if checked.claims_dict is not None:
                context["claims"] = checked.claims_dict
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
                    claims_json=checked.claims_json,
                    evidence_digest=context["evidence_digest"],
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

        outcome = await self._commit(decide, nonce=request.nonce)
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
        claims_dict = checked.claims.to_dict()
        return _Checked(checked, claims_dict, canonical_json(claims_dict))

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
            context: dict[str, Any] = {
                "kind": AuditKind.RELEASE,
                "action": "renew",
                "client_address": client_address,
                "request_id": request_id,
                "evidence_digest": None,
                "model_ids": tuple(request.models or ()),
            }
            refusal = Refusal(ErrorKind.FORBIDDEN, "session_invalid", str(exc))
            try:  # best effort: refused either way
                await self._commit(lambda tx: tx.append_audit(_refusal_entry(context, refusal)))
            except ServiceError:
                _log.error("could not audit a refused renew request")
            self._refused(context, refusal)
        except StorageError as exc:
            raise _unavailable(exc) from exc
        try:
            claims = Claims.from_dict(session.claims())
            recipient = hpke.HpkePublicKey.decode(session.hpke_suite, session.public_key)
        except (AttestationError, ProtocolError) as exc:  # pragma: no cover - we stored them
            raise ServiceError(
                ErrorKind.UNAVAILABLE, "session_corrupt", "the stored session is unusable"
            ) from exc
        models, outside = session_models(request.models, session.model_ids)
        context = {
            "kind": AuditKind.RELEASE,
            "action": "renew",
            "actor": session.token_id,
            "client_address": client_address,
            "request_id": request_id,
            "evidence_digest": session.evidence_digest,
            "model_ids": tuple(request.models or ()),
            "claims": claims.to_dict(),
        }
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
        durable: bool = True,
        nonce: bytes | None = None,
    ) -> _T:
        """Run ``work`` in the store's next group commit; storage failures become 503s.

        A unit still waiting for the database after the busy timeout is withdrawn (it never
        runs) and the request gets ``store_unavailable``; one already running is waited for.
        """
        try:
            future = self._store.submit(work, durable=durable, nonce=nonce)
            outcome = asyncio.wrap_future(future)
            try:
                return await asyncio.wait_for(
                    asyncio.shield(outcome), timeout=self._settings.busy_timeout
                )
            except TimeoutError:
                if not future.cancel():
                    return await outcome
                _log.error("the key store did not take a request within the busy timeout")
                raise ServiceError(
                    ErrorKind.UNAVAILABLE,
                    "store_unavailable",
                    "the key store is busy; retry later",
                ) from None
        except StorageError as exc:
            raise _unavailable(exc) from exc

    def _policy(self, record: PolicyRecord) -> Policy:
        cached = self._policies.get(record.digest)
        if cached is not None:
            return cached
        policy = Policy.from_json(record.document, source=f"policy v{record.version}")
        with self._policy_lock:
            if len(self._policies) >= _POLICY_CACHE_SIZE:
                self._policies.clear()
            self._policies[record.digest] = policy
        return policy

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
                policy = self._policy(item.policy)
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
        context: dict[str, Any],
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
            "lease_expires_at": _rfc3339(lease_end),
            "session": session_id,
        }
        models = context["model_ids"] or tuple(
            [g.material.model_id for g in grants] + [d.model_id for d in denials]
        )
        return AuditEntry(
            kind=context["kind"],
            action=context["action"],
            decision=decision,
            actor=context.get("actor"),
            client_address=context["client_address"],
            request_id=context["request_id"],
            evidence_digest=context["evidence_digest"],
            claims=context.get("claims"),
            model_ids=models,
            reasons=reasons,
            details=details,
        )

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

    def _refused(self, context: dict[str, Any], refusal: Refusal) -> NoReturn:
        """Log and count a refused request (audited in its commit), then raise."""
        self._report.refuse(context["action"], context["request_id"], refusal)

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

    # -- transactions ---------------------------------------------------------------------------

    def _audited_transaction(self) -> Any:
        return _Transaction(self._store)

    def _admin_change(
        self,
        actor: Actor,
        action: str,
        model_ids: Sequence[str],
        change: Callable[[Any], tuple[Any, dict[str, Any]]],
    ) -> Any:
        """Run ``change(tx) -> (result, audit details)`` and its audit record atomically.

        A failed change (not found, conflict, invalid) is audited as ``decision: error``.
        """
        try:
            with self._audited_transaction() as tx:
                result, details = change(tx)
                tx.append_audit(
                    AuditEntry(
                        kind=AuditKind.ADMIN,
                        action=action,
                        decision="ok",
                        actor=actor.token_id,
                        client_address=actor.client_address,
                        model_ids=tuple(model_ids),
                        details=details,
                    )
                )
            return result
        except (NotFoundError, ConflictError, ConfigError, ServiceError) as exc:
            error = _service_error(exc)
            try:
                self._store.append_audit(
                    AuditEntry(
                        kind=AuditKind.ADMIN,
                        action=action,
                        decision="error",
                        actor=actor.token_id,
                        client_address=actor.client_address,
                        model_ids=tuple(model_ids),
                        reasons=(error.code,),
                    )
                )
            except StorageError as audit_exc:
                _log.error("could not audit a failed %s: %s", action, audit_exc)
            raise error from exc

    # -- admin: authentication --------------------------------------------------------------------

    def authenticate_admin(self, token: str, *, client_address: str | None) -> Actor:
        try:
            record = authenticate_admin(self._store, token, now=self.now())
        except InvalidTokenError as exc:
            _log.warning(
                "admin request refused: %s token",
                exc.reason,
                extra={"client_address": client_address},
            )
            raise ServiceError(ErrorKind.FORBIDDEN, "token_invalid", str(exc)) from exc
        except StorageError as exc:
            raise _unavailable(exc) from exc
        return Actor(
            token_id=record.token_id,
            client_address=client_address,
            name=record.name,
            scopes=record.scopes,
            expires_at=record.expires_at,
        )

    def authorize(
        self,
        actor: Actor,
        needs: Sequence[AdminScope],
        *,
        action: str,
        purpose: str,
        model_ids: Sequence[str] = (),
    ) -> None:
        """Return if ``actor`` holds one of ``needs``; else audit the refusal and raise
        ``403 insufficient_scope`` naming the scope (``purpose``: "set policies"...)."""
        if actor.scopes.intersection(needs):
            return
        names = " or ".join(f"'{scope.value}'" for scope in needs)
        self._refuse(
            actor,
            action,
            model_ids,
            f"this token lacks scope {names}, needed to {purpose}",
            {"needed": [scope.value for scope in needs]},
        )

    def _refuse(
        self,
        actor: Actor,
        action: str,
        model_ids: Sequence[str],
        message: str,
        details: dict[str, Any],
        *,
        code: str = "insufficient_scope",
    ) -> NoReturn:
        """Log and audit an admin action this token may not take, then raise ``403 code``.

        The refusal stands even if its audit record cannot be written (logged)."""
        _log.warning(
            "admin request refused (%s): %s; token %s %r",
            code,
            message,
            actor.token_id,
            actor.name,
            extra={"client_address": actor.client_address, "action": action},
        )
        try:
            self._store.append_audit(
                AuditEntry(
                    kind=AuditKind.ADMIN,
                    action=action,
                    decision="refuse",
                    actor=actor.token_id,
                    client_address=actor.client_address,
                    model_ids=tuple(model_ids),
                    reasons=(code,),
                    details={**details, "scopes": _scope_list(actor.scopes)},
                )
            )
        except StorageError as exc:
            _log.error("could not audit a refused %s: %s", action, exc)
        raise ServiceError(ErrorKind.FORBIDDEN, code, message)

    # -- admin: models and keys -------------------------------------------------------------------

    def _wrapper(self, model_id: str, dek: DataKey) -> WrapFunction:
        def wrap(version: int) -> WrappedDek:
            return WrappedDek(
                blob=self._master.wrap(dek, wrap_aad(model_id, version)),
                wrap_key_id=self._master.key_id,
                fingerprint=dek.fingerprint,
            )

        return wrap

    def create_model(
        self, actor: Actor, model_id: str, *, key: DataKey | None = None
    ) -> CreatedModel:
        dek = key if key is not None else generate_key()

        def change(tx: Any) -> tuple[CreatedModel, dict[str, Any]]:
            model, version = tx.create_model(model_id, wrap=self._wrapper(model_id, dek))
            created = CreatedModel(model=_model_info(model, 1, None), key=_key_info(version))
            return created, {"key_version": 1, "imported": key is not None}

        result: CreatedModel = self._admin_change(actor, "model.create", [model_id], change)
        return result

    def list_models(self) -> list[ModelInfo]:
        out = []
        for model in self._read(self._store.list_models):
            current = self._read(self._store.current_key_version, model.model_id)
            policy = self._read(self._store.current_policy, model.model_id)
            out.append(
                _model_info(
                    model,
                    current.version if current else None,
                    policy.version if policy else None,
                )
            )
        return out

    def show_model(self, model_id: str) -> ModelDetail:
        model = self._read(self._store.get_model, model_id)
        if model is None:
            raise _not_found_model(model_id)
        keys = self._read(self._store.list_key_versions, model_id)
        current = self._read(self._store.current_key_version, model_id)
        policy = self._read(self._store.current_policy, model_id)
        return ModelDetail(
            model=_model_info(
                model, current.version if current else None, policy.version if policy else None
            ),
            keys=tuple(_key_info(k) for k in keys),
            policy=_policy_info(policy) if policy else None,
        )

    def delete_model(self, actor: Actor, model_id: str) -> ModelInfo:
        def change(tx: Any) -> tuple[ModelInfo, dict[str, Any]]:
            model = tx.delete_model(model_id)
            return _model_info(model, None, None), {"crypto_shredded": True}

        result: ModelInfo = self._admin_change(actor, "model.delete", [model_id], change)
        return result

    def list_keys(self, model_id: str) -> list[KeyVersionInfo]:
        if self._read(self._store.get_model, model_id) is None:
            raise _not_found_model(model_id)
        return [_key_info(k) for k in self._read(self._store.list_key_versions, model_id)]

    def rotate_key(
        self, actor: Actor, model_id: str, *, key: DataKey | None = None
    ) -> KeyVersionInfo:
        dek = key if key is not None else generate_key()

        def change(tx: Any) -> tuple[KeyVersionInfo, dict[str, Any]]:
            record = tx.add_key_version(model_id, wrap=self._wrapper(model_id, dek))
            return _key_info(record), {"key_version": record.version, "imported": key is not None}

        result: KeyVersionInfo = self._admin_change(actor, "key.rotate", [model_id], change)
        return result

    def revoke_key(self, actor: Actor, model_id: str, version: int) -> KeyVersionInfo:
        def change(tx: Any) -> tuple[KeyVersionInfo, dict[str, Any]]:
            record = tx.revoke_key_version(model_id, version)
            return _key_info(record), {"key_version": version}

        result: KeyVersionInfo = self._admin_change(actor, "key.revoke", [model_id], change)
        return result

    # -- admin: policies --------------------------------------------------------------------------

    def set_policy(self, actor: Actor, model_id: str, document: dict[str, Any]) -> PolicyInfo:
        """Store a new policy version. One that turns on an ``*_insecure`` flag is logged at
        WARNING (model, flags, token) and its audit record lists the flags."""
        insecure: tuple[str, ...] = ()

        def change(tx: Any) -> tuple[PolicyInfo, dict[str, Any]]:
            nonlocal insecure
            policy = Policy.from_dict(document, source=f"policy for {model_id}")
            insecure = policy.insecure_flags
            record = tx.set_policy(model_id, canonical_policy(policy))
            details: dict[str, Any] = {
                "policy_version": record.version,
                "policy_digest": record.digest,
            }
            if insecure:
                details["insecure"] = list(insecure)
            return _policy_info(record), details

        result: PolicyInfo = self._admin_change(actor, "policy.set", [model_id], change)
        if insecure:
            _log.warning(
                "INSECURE policy v%d set for model %s: %s; by admin token %s %r",
                result.version,
                model_id,
                ", ".join(insecure),
                actor.token_id,
                actor.name,
                extra={"model_id": model_id, "insecure": list(insecure)},
            )
        return result

    def insecure_policies(self) -> dict[str, int]:
        """How many live models' current policies turn on each ``*_insecure`` flag."""
        counts = dict.fromkeys(INSECURE_FLAGS, 0)
        for record in self._read(self._store.current_policies):
            try:
                policy = self._policy(record)
            except ConfigError:  # an invalid stored policy releases nothing
                continue
            for flag in policy.insecure_flags:
                counts[flag] += 1
        return counts

    def show_policy(self, model_id: str) -> PolicyInfo:
        if self._read(self._store.get_model, model_id) is None:
            raise _not_found_model(model_id)
        record = self._read(self._store.current_policy, model_id)
        if record is None:
            raise ServiceError(
                ErrorKind.NOT_FOUND,
                "no_policy",
                f"model {model_id!r} has no release policy yet; set one with "
                f"`sealtorch admin policy set {model_id} FILE`",
            )
        return _policy_info(record)

    def policy_history(self, model_id: str) -> list[PolicyInfo]:
        if self._read(self._store.get_model, model_id, include_deleted=True) is None:
            raise _not_found_model(model_id)
        return [_policy_info(r) for r in self._read(self._store.list_policies, model_id)]

    # -- admin: tokens ----------------------------------------------------------------------------

    def create_token(
        self,
        actor: Actor,
        *,
        name: str,
        scopes: Sequence[AdminScope],
        expires_in: int | None = None,
    ) -> CreatedToken:
        """A new admin token with ``scopes`` (at least one), none of which ``actor`` lacks, and
        that expires no later than ``actor``'s token: a token cannot mint a stronger one."""
        wanted = frozenset(scopes)
        expires_at = self.now() + timedelta(seconds=expires_in) if expires_in else None
        missing = [scope for scope in ADMIN_SCOPES if scope in wanted - actor.scopes]
        if missing:
            names = ", ".join(f"'{scope.value}'" for scope in missing)
            self._refuse(
                actor,
                "token.create",
                (),
                f"this token lacks scope {names}, so it cannot create a token that has it",
                {"requested": _scope_list(wanted)},
            )
        if actor.expires_at is not None and (expires_at is None or expires_at > actor.expires_at):
            left = max(60, int((actor.expires_at - self.now()).total_seconds()))
            self._refuse(
                actor,
                "token.create",
                (),
                f"this token expires at {_rfc3339(actor.expires_at)}; a token it creates may not "
                f"outlive it (give an expiry of at most {left} seconds)",
                {"requested_expires_in": expires_in},
                code="token_outlives_creator",
            )
        issued = issue_token(TokenKind.ADMIN)

        def change(tx: Any) -> tuple[CreatedToken, dict[str, Any]]:
            record = tx.create_admin_token(
                token_id=issued.token_id,
                digest=issued.digest,
                name=name,
                scopes=wanted,
                expires_at=expires_at,
            )
            return CreatedToken(info=_token_info(record), token=issued.token), {
                "token_id": issued.token_id,
                "name": name,
                "scopes": _scope_list(wanted),
            }

        result: CreatedToken = self._admin_change(actor, "token.create", [], change)
        return result

    def list_tokens(self) -> list[TokenInfo]:
        return [_token_info(r) for r in self._read(self._store.list_admin_tokens)]

    def revoke_token(self, actor: Actor, token_id: str) -> TokenInfo:
        """Revoke a token whose scopes ``actor`` all holds (a token-admin cannot disarm a
        stronger token), unless it is the last usable token holding every scope (without one,
        no token could ever grant some scope again)."""
        target = self._read(self._store.get_admin_token, token_id)
        if target is not None and not target.scopes <= actor.scopes:
            missing = [scope for scope in ADMIN_SCOPES if scope in target.scopes - actor.scopes]
            names = ", ".join(f"'{scope.value}'" for scope in missing)
            self._refuse(
                actor,
                "token.revoke",
                (),
                f"this token lacks scope {names} that token {token_id} holds, so it cannot "
                "revoke it",
                {"token_id": token_id},
            )

        def change(tx: Any) -> tuple[TokenInfo, dict[str, Any]]:
            now = self.now()
            usable = [r for r in self._store.list_admin_tokens() if r.usable_at(now)]
            if [r.token_id for r in usable] == [token_id]:
                raise ConflictError(
                    "this is the last usable admin token; create another one before revoking it"
                )
            full = [r.token_id for r in usable if r.scopes >= frozenset(ADMIN_SCOPES)]
            if full == [token_id]:
                raise ConflictError(
                    "this is the last usable admin token with every scope; create another one "
                    "(`sealtorch admin token create` with every --scope) before revoking it"
                )
            record = tx.revoke_admin_token(token_id)
            return _token_info(record), {"token_id": token_id}

        result: TokenInfo = self._admin_change(actor, "token.revoke", [], change)
        return result

    # -- admin: audit -----------------------------------------------------------------------------

    def audit_page(self, *, after: int = 0, limit: int = 500) -> AuditPage:
        limit = max(1, min(limit, _MAX_AUDIT_PAGE))
        head = self._read(self._store.audit_head)
        records = self._read(
            lambda: list(
                itertools.islice(
                    self._store.iter_audit(after_seq=max(0, after), up_to_seq=head.seq), limit
                )
            )
        )
        last = records[-1].seq if records else after
        return AuditPage(
            head=AuditHeadInfo(seq=head.seq, hash=head.hash),
            records=tuple(r.as_json() for r in records),
            next_after=last if records and last < head.seq else None,
        )

    def audit_checkpoint(self) -> SignedCheckpoint:
        """The audit head, signed with the release-signing key (``protocol.checkpoint``): the
        owner keeps it outside this host, and a later rollback or rewrite fails verification."""
        head = self._read(self._store.audit_head)
        try:
            return issue_checkpoint(
                self._signer, seq=head.seq, head_hash=head.hash, issued_at=self.now()
            )
        except StorageError as exc:
            _log.error("cannot sign an audit checkpoint: %s", exc)
            raise ServiceError(
                ErrorKind.UNAVAILABLE,
                "signing_unavailable",
                "the release-signing key could not sign; the operator must check the signing key "
                "configuration",
            ) from exc

    # -- admin: content key wrapping (encrypt --keyserver, rewrap --keyserver) ---------------------

    def _current_dek(self, model_id: str) -> tuple[int, DataKey]:
        current = self._read(self._store.current_key_version, model_id)
        if current is None:
            if self._read(self._store.get_model, model_id) is None:
                raise _not_found_model(model_id)
            raise ServiceError(
                ErrorKind.CONFLICT,
                "no_active_key",
                f"model {model_id!r} has no active key version; rotate to create one",
            )
        return current.version, self._unwrap(model_id, current.version)

    def _unwrap(self, model_id: str, version: int) -> DataKey:
        wrapped = self._read(self._store.get_wrapped_key, model_id, version)
        if wrapped is None:
            raise ServiceError(
                ErrorKind.NOT_FOUND,
                "unknown_key_version",
                f"model {model_id!r} has no key version {version} (or it was destroyed)",
            )
        try:
            return self._master.unwrap(wrapped.blob, wrap_aad(model_id, version))
        except (IntegrityError, StorageError) as exc:
            raise ServiceError(
                ErrorKind.UNAVAILABLE,
                "key_unavailable",
                "a data key could not be unwrapped by the master key",
            ) from exc

    def wrap(self, actor: Actor, request: WrapRequest) -> KeyBlockWire:
        """Wrap a new file's content key under the model's current data key version."""
        from sealtorch.sealed.keywrap import wrap_content_key

        def change(tx: Any) -> tuple[KeyBlockWire, dict[str, Any]]:
            del tx
            version, dek = self._current_dek(request.model_id)
            block = wrap_content_key(
                dek,
                model_id=request.model_id,
                key_version=version,
                body_digest=request.body_digest,
                cek=request.cek,
            )
            wire = KeyBlockWire(
                key_version=block.key_version,
                salt=block.salt,
                nonce=block.nonce,
                wrapped_cek=block.wrapped_cek,
            )
            return wire, {"key_version": version, "body_digest": request.body_digest.hex()}

        result: KeyBlockWire = self._admin_change(actor, "key.wrap", [request.model_id], change)
        return result

    def rewrap(self, actor: Actor, request: RewrapRequest) -> KeyBlockWire:
        """Unwrap a file's content key with its (possibly revoked) version and wrap it again
        under the current version; the content key never leaves the server."""
        from sealtorch.sealed.header import BodyHeader, Header, KeyBlock
        from sealtorch.sealed.keywrap import unwrap_content_key, wrap_content_key

        model_id = request.body.model_id

        def change(tx: Any) -> tuple[KeyBlockWire, dict[str, Any]]:
            del tx
            try:
                header = Header(
                    body=BodyHeader(
                        model_id=model_id,
                        plaintext_size=request.body.plaintext_size,
                        chunk_size=request.body.chunk_size,
                        salt=request.body.salt,
                        suite=request.body.suite,
                    ),
                    key=KeyBlock(
                        key_version=request.key.key_version,
                        salt=request.key.salt,
                        nonce=request.key.nonce,
                        wrapped_cek=request.key.wrapped_cek,
                    ),
                )
            except ConfigError as exc:
                raise ServiceError(ErrorKind.INVALID, "invalid_header", str(exc)) from exc
            old = self._unwrap(model_id, header.key_version)
            try:
                cek = unwrap_content_key(old, header)
            except IntegrityError as exc:
                raise ServiceError(
                    ErrorKind.INVALID,
                    "header_invalid",
                    f"the header does not authenticate under key version {header.key_version} "
                    f"of {model_id!r}: it was modified or belongs to another key server",
                ) from exc
            version, dek = self._current_dek(model_id)
            block = wrap_content_key(
                dek, model_id=model_id, key_version=version, body_digest=header.body.digest, cek=cek
            )
            del cek
            wire = KeyBlockWire(
                key_version=block.key_version,
                salt=block.salt,
                nonce=block.nonce,
                wrapped_cek=block.wrapped_cek,
            )
            return wire, {"from_version": header.key_version, "key_version": version}

        result: KeyBlockWire = self._admin_change(actor, "key.rewrap", [model_id], change)
        return result

    # -- reads ------------------------------------------------------------------------------------

    def _read(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except StorageError as exc:
            raise _unavailable(exc) from exc


class _Transaction:
    """``store.transaction()`` whose storage failures become ``audit_unavailable`` (503)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._context: Any = None

    def __enter__(self) -> Any:
        self._context = self._store.transaction()
        try:
            return self._context.__enter__()
        except StorageError as exc:
            raise _unavailable(exc) from exc

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        try:
            suppressed = bool(self._context.__exit__(exc_type, exc, tb))
            if isinstance(exc, StorageError) and not suppressed:
                raise exc  # raised inside the block (e.g. by append_audit): map it below
            return suppressed
        except AuditError as failure:
            _log.error("audit record not written; nothing released or changed: %s", failure)
            raise ServiceError(
                ErrorKind.UNAVAILABLE,
                "audit_unavailable",
                "the audit record could not be written, so nothing was released or changed; "
                "retry later",
            ) from failure
        except StorageError as failure:
            raise _unavailable(failure) from failure


def _unavailable(exc: StorageError) -> ServiceError:
    if isinstance(exc, AuditError):
        return ServiceError(
            ErrorKind.UNAVAILABLE,
            "audit_unavailable",
            "the audit record could not be written, so nothing was released or changed; "
            "retry later",
        )
    _log.error("key store failure: %s", exc)
    return ServiceError(
        ErrorKind.UNAVAILABLE,
        "store_unavailable",
        "the key store is unavailable; retry later",
    )


def _service_error(exc: Error) -> ServiceError:
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, NotFoundError):
        return ServiceError(ErrorKind.NOT_FOUND, "not_found", str(exc))
    if isinstance(exc, ConflictError):
        return ServiceError(ErrorKind.CONFLICT, "conflict", str(exc))
    return ServiceError(ErrorKind.INVALID, "invalid_request", str(exc))


def _not_found_model(model_id: str) -> ServiceError:
    return ServiceError(ErrorKind.NOT_FOUND, "unknown_model", f"model {model_id!r} does not exist")


def _no_active_key(model_id: str) -> DeniedModel:
    return DeniedModel(
        model_id=model_id,
        reasons=("no_active_key",),
        message=f"model {model_id!r} has no active (unrevoked) key version",
    )


def _policy_info(record: PolicyRecord) -> PolicyInfo:
    return PolicyInfo(
        model_id=record.model_id,
        version=record.version,
        digest=record.digest,
        created_at=record.created_at,
        policy=record.parsed(),
    )


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
