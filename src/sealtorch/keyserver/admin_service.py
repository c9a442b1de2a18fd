"""Key administration: models, key versions, policies, admin tokens, the audit log, and
content key wrapping for ``sealtorch encrypt/rewrap --keyserver``.

:class:`AdminService` knows nothing about HTTP: it answers with domain records
(:mod:`sealtorch.keyserver.records`, and the small views below) and the admin routes map them
to the wire (:mod:`sealtorch.protocol.admin`). Its methods are synchronous and thread-safe (the
app runs them in a thread pool). Every change, and every use of a data key (wrap, rewrap), is
audited in the same transaction as the change; a failed one is audited as ``decision: error``.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NoReturn

from sealtorch.attestation import Policy
from sealtorch.attestation.policy import INSECURE_FLAGS
from sealtorch.errors import AuditError, ConfigError, Error, IntegrityError, StorageError
from sealtorch.keys import DataKey, generate_key
from sealtorch.keyserver._service import (
    Actor,
    Clock,
    ErrorKind,
    PolicyCache,
    ServiceError,
    not_found_model,
    rfc3339,
    scope_list,
    unavailable,
)
from sealtorch.keyserver.masterkey import MasterKey, wrap_aad
from sealtorch.keyserver.records import (
    AdminTokenRecord,
    ConflictError,
    KeyVersionRecord,
    ModelRecord,
    NotFoundError,
    PolicyRecord,
    WrapFunction,
    WrappedDek,
)
from sealtorch.keyserver.signingkey import ReleaseSigningKey
from sealtorch.keyserver.store import Store
from sealtorch.keyserver.tokens import InvalidTokenError, TokenKind, authenticate_admin, issue_token
from sealtorch.protocol.admin import ADMIN_SCOPES, AdminScope, RewrapRequest, WrapRequest
from sealtorch.protocol.audit import AuditEntry, AuditHead, AuditKind, AuditRecord
from sealtorch.protocol.checkpoint import SignedCheckpoint, issue_checkpoint
from sealtorch.sealed.header import KeyBlock

__all__ = [
    "AdminService",
    "AuditSlice",
    "ModelSummary",
    "ModelView",
    "NewModel",
    "NewToken",
    "canonical_policy",
]

_log = logging.getLogger("sealtorch.keyserver.service")

_MAX_AUDIT_PAGE = 1000


@dataclass(frozen=True, slots=True)
class ModelSummary:
    """A live (or just deleted) model with its current key and policy versions."""

    model: ModelRecord
    current_key_version: int | None
    policy_version: int | None


@dataclass(frozen=True, slots=True)
class ModelView:
    """A model with all its key versions and its current policy."""

    summary: ModelSummary
    keys: tuple[KeyVersionRecord, ...]
    policy: PolicyRecord | None


@dataclass(frozen=True, slots=True)
class NewModel:
    model: ModelSummary
    key: KeyVersionRecord


@dataclass(frozen=True, slots=True)
class NewToken:
    """A created admin token and its secret (shown once)."""

    record: AdminTokenRecord
    token: str


@dataclass(frozen=True, slots=True)
class AuditSlice:
    """Audit records after a sequence number, the head they were read under, and where the
    next page starts (``None``: this page reaches the head)."""

    head: AuditHead
    records: tuple[AuditRecord, ...]
    next_after: int | None


class AdminService:
    """Key administration over a :class:`Store` (see the module docstring)."""

    def __init__(
        self,
        *,
        store: Store,
        master_key: MasterKey,
        signing_key: ReleaseSigningKey,
        clock: Clock,
        policies: PolicyCache,
    ) -> None:
        self._store = store
        self._master = master_key
        self._signer = signing_key
        self.now: Callable[[], datetime] = clock.now
        self._policies = policies

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
            raise unavailable(exc) from exc
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
                    details={**details, "scopes": scope_list(actor.scopes)},
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

    def create_model(self, actor: Actor, model_id: str, *, key: DataKey | None = None) -> NewModel:
        dek = key if key is not None else generate_key()

        def change(tx: Any) -> tuple[NewModel, dict[str, Any]]:
            model, version = tx.create_model(model_id, wrap=self._wrapper(model_id, dek))
            created = NewModel(ModelSummary(model, 1, None), version)
            return created, {"key_version": 1, "imported": key is not None}

        result: NewModel = self._admin_change(actor, "model.create", [model_id], change)
        return result

    def list_models(self) -> list[ModelSummary]:
        return [self._summary(model) for model in self._read(self._store.list_models)]

    def _summary(self, model: ModelRecord) -> ModelSummary:
        current = self._read(self._store.current_key_version, model.model_id)
        policy = self._read(self._store.current_policy, model.model_id)
        return ModelSummary(
            model, current.version if current else None, policy.version if policy else None
        )

    def show_model(self, model_id: str) -> ModelView:
        model = self._read(self._store.get_model, model_id)
        if model is None:
            raise not_found_model(model_id)
        keys = self._read(self._store.list_key_versions, model_id)
        summary = self._summary(model)
        policy = self._read(self._store.current_policy, model_id)
        return ModelView(summary, tuple(keys), policy)

    def delete_model(self, actor: Actor, model_id: str) -> ModelSummary:
        def change(tx: Any) -> tuple[ModelSummary, dict[str, Any]]:
            model = tx.delete_model(model_id)
            return ModelSummary(model, None, None), {"crypto_shredded": True}

        result: ModelSummary = self._admin_change(actor, "model.delete", [model_id], change)
        return result

    def list_keys(self, model_id: str) -> list[KeyVersionRecord]:
        if self._read(self._store.get_model, model_id) is None:
            raise not_found_model(model_id)
        return list(self._read(self._store.list_key_versions, model_id))

    def rotate_key(
        self, actor: Actor, model_id: str, *, key: DataKey | None = None
    ) -> KeyVersionRecord:
        dek = key if key is not None else generate_key()

        def change(tx: Any) -> tuple[KeyVersionRecord, dict[str, Any]]:
            record = tx.add_key_version(model_id, wrap=self._wrapper(model_id, dek))
            return record, {"key_version": record.version, "imported": key is not None}

        result: KeyVersionRecord = self._admin_change(actor, "key.rotate", [model_id], change)
        return result

    def revoke_key(self, actor: Actor, model_id: str, version: int) -> KeyVersionRecord:
        def change(tx: Any) -> tuple[KeyVersionRecord, dict[str, Any]]:
            record = tx.revoke_key_version(model_id, version)
            return record, {"key_version": version}

        result: KeyVersionRecord = self._admin_change(actor, "key.revoke", [model_id], change)
        return result

    # -- admin: policies --------------------------------------------------------------------------

    def set_policy(self, actor: Actor, model_id: str, document: dict[str, Any]) -> PolicyRecord:
        """Store a new policy version. One that turns on an ``*_insecure`` flag is logged at
        WARNING (model, flags, token) and its audit record lists the flags."""
        insecure: tuple[str, ...] = ()

        def change(tx: Any) -> tuple[PolicyRecord, dict[str, Any]]:
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
            return record, details

        result: PolicyRecord = self._admin_change(actor, "policy.set", [model_id], change)
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
                policy = self._policies.get(record)
            except ConfigError:  # an invalid stored policy releases nothing
                continue
            for flag in policy.insecure_flags:
                counts[flag] += 1
        return counts

    def show_policy(self, model_id: str) -> PolicyRecord:
        if self._read(self._store.get_model, model_id) is None:
            raise not_found_model(model_id)
        record = self._read(self._store.current_policy, model_id)
        if record is None:
            raise ServiceError(
                ErrorKind.NOT_FOUND,
                "no_policy",
                f"model {model_id!r} has no release policy yet; set one with "
                f"`sealtorch admin policy set {model_id} FILE`",
            )
        result: PolicyRecord = record
        return result

    def policy_history(self, model_id: str) -> list[PolicyRecord]:
        if self._read(self._store.get_model, model_id, include_deleted=True) is None:
            raise not_found_model(model_id)
        return list(self._read(self._store.list_policies, model_id))

    # -- admin: tokens ----------------------------------------------------------------------------

    def create_token(
        self,
        actor: Actor,
        *,
        name: str,
        scopes: Sequence[AdminScope],
        expires_in: int | None = None,
    ) -> NewToken:
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
                {"requested": scope_list(wanted)},
            )
        if actor.expires_at is not None and (expires_at is None or expires_at > actor.expires_at):
            left = max(60, int((actor.expires_at - self.now()).total_seconds()))
            self._refuse(
                actor,
                "token.create",
                (),
                f"this token expires at {rfc3339(actor.expires_at)}; a token it creates may not "
                f"outlive it (give an expiry of at most {left} seconds)",
                {"requested_expires_in": expires_in},
                code="token_outlives_creator",
            )
        issued = issue_token(TokenKind.ADMIN)

        def change(tx: Any) -> tuple[NewToken, dict[str, Any]]:
            record = tx.create_admin_token(
                token_id=issued.token_id,
                digest=issued.digest,
                name=name,
                scopes=wanted,
                expires_at=expires_at,
            )
            return NewToken(record, issued.token), {
                "token_id": issued.token_id,
                "name": name,
                "scopes": scope_list(wanted),
            }

        result: NewToken = self._admin_change(actor, "token.create", [], change)
        return result

    def list_tokens(self) -> list[AdminTokenRecord]:
        return list(self._read(self._store.list_admin_tokens))

    def revoke_token(self, actor: Actor, token_id: str) -> AdminTokenRecord:
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

        def change(tx: Any) -> tuple[AdminTokenRecord, dict[str, Any]]:
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
            return record, {"token_id": token_id}

        result: AdminTokenRecord = self._admin_change(actor, "token.revoke", [], change)
        return result

    # -- admin: audit -----------------------------------------------------------------------------

    def audit_page(self, *, after: int = 0, limit: int = 500) -> AuditSlice:
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
        return AuditSlice(head, tuple(records), last if records and last < head.seq else None)

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
                raise not_found_model(model_id)
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

    def wrap(self, actor: Actor, request: WrapRequest) -> KeyBlock:
        """Wrap a new file's content key under the model's current data key version."""
        from sealtorch.sealed.keywrap import wrap_content_key

        def change(tx: Any) -> tuple[KeyBlock, dict[str, Any]]:
            del tx
            version, dek = self._current_dek(request.model_id)
            block = wrap_content_key(
                dek,
                model_id=request.model_id,
                key_version=version,
                body_digest=request.body_digest,
                cek=request.cek,
            )
            return block, {"key_version": version, "body_digest": request.body_digest.hex()}

        result: KeyBlock = self._admin_change(actor, "key.wrap", [request.model_id], change)
        return result

    def rewrap(self, actor: Actor, request: RewrapRequest) -> KeyBlock:
        """Unwrap a file's content key with its (possibly revoked) version and wrap it again
        under the current version; the content key never leaves the server."""
        from sealtorch.sealed.header import BodyHeader, Header, SetBlock
        from sealtorch.sealed.keywrap import unwrap_content_key, wrap_content_key

        model_id = request.body.model_id

        def change(tx: Any) -> tuple[KeyBlock, dict[str, Any]]:
            del tx
            try:
                header = Header(
                    body=BodyHeader(
                        model_id=model_id,
                        plaintext_size=request.body.plaintext_size,
                        chunk_size=request.body.chunk_size,
                        salt=request.body.salt,
                        suite=request.body.suite,
                        set=None
                        if request.set is None
                        else SetBlock(
                            set_id=request.set.id,
                            index=request.set.index,
                            count=request.set.count,
                            digests=tuple(request.set.digests),
                        ),
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
            return block, {"from_version": header.key_version, "key_version": version}

        result: KeyBlock = self._admin_change(actor, "key.rewrap", [model_id], change)
        return result

    # -- reads ------------------------------------------------------------------------------------

    def _read(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except StorageError as exc:
            raise unavailable(exc) from exc


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
            raise unavailable(exc) from exc

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
            raise unavailable(failure) from failure


def canonical_policy(policy: Policy) -> str:
    """The stored text of a policy: canonical JSON of its normalised form (digest = SHA-256)."""
    return json.dumps(policy.to_dict(), sort_keys=True, separators=(",", ":"))


def _service_error(exc: Error) -> ServiceError:
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, NotFoundError):
        return ServiceError(ErrorKind.NOT_FOUND, "not_found", str(exc))
    if isinstance(exc, ConflictError):
        return ServiceError(ErrorKind.CONFLICT, "conflict", str(exc))
    return ServiceError(ErrorKind.INVALID, "invalid_request", str(exc))
