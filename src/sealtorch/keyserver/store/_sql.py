"""The SQLAlchemy implementation of :class:`~sealtorch.keyserver.store.Store`.

SQLite: WAL journal, foreign keys on, a busy timeout, ``synchronous=FULL`` by default (a
committed key or audit record survives power loss, not just a crash). pysqlite's own transaction
handling is switched off so that writes start with ``BEGIN IMMEDIATE`` (the write lock is taken
up front: no deadlock-prone lock upgrades) and reads with a plain ``BEGIN``.

PostgreSQL (psycopg 3): READ COMMITTED; a ``lock_timeout`` equal to the busy timeout so that a
stuck lock becomes an error instead of a hang; row locks (``SELECT ... FOR UPDATE``) serialise
version allocation per model and audit appends on the single ``audit_head`` row, so several key
server processes on one database keep one consistent chain.

Rows are converted to the records of ``sealtorch.keyserver.records`` before they leave.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc

from sealtorch.errors import AuditError, ConfigError, StorageError
from sealtorch.keyserver.records import (
    AdminTokenRecord,
    ConflictError,
    KeyState,
    KeyVersionRecord,
    ModelRecord,
    NonceStatus,
    NotFoundError,
    PolicyRecord,
    ReleaseMaterial,
    SessionRecord,
    WrapFunction,
    WrappedDek,
    WrappedKey,
    check_model_id,
    utc,
)
from sealtorch.keyserver.store import _schema as t
from sealtorch.keyserver.store._migrations import applied_version, latest_version, run_migrations
from sealtorch.protocol.admin import AdminScope
from sealtorch.protocol.audit import AuditEntry, AuditHead, AuditRecord, build_record

__all__ = ["SqlStore"]

_log = logging.getLogger(__name__)

_T = TypeVar("_T")

# SQLAlchemy's Row is generic over its column types; the converters below read by name.
_Row = Any

_WRITE = "sealtorch_write"
_AUDIT_BATCH = 500
#: Most submitted units of work committed together in one group (one transaction).
_MAX_GROUP = 256
_TOKEN_ID = re.compile(r"^[0-9a-f]{16}$")
_SYNC_MODES = ("FULL", "NORMAL", "EXTRA")


def _system_clock() -> datetime:
    return datetime.now(UTC)


def _first_line(exc: BaseException) -> str:
    original = getattr(exc, "orig", None) or exc
    text = str(original).strip().splitlines()
    return f"{type(original).__name__}: {text[0][:200]}" if text else type(original).__name__


# --- row -> record ----------------------------------------------------------------------------


def _model(row: _Row) -> ModelRecord:
    return ModelRecord(model_id=row.model_id, created_at=row.created_at, deleted_at=row.deleted_at)


def _key_version(row: _Row) -> KeyVersionRecord:
    return KeyVersionRecord(
        model_id=row.model_id,
        version=row.version,
        state=KeyState(row.state),
        wrap_key_id=row.wrap_key_id,
        fingerprint=row.fingerprint,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


def _wrapped_key(row: _Row) -> WrappedKey:
    return WrappedKey(
        model_id=row.model_id,
        version=row.version,
        state=KeyState(row.state),
        wrap_key_id=row.wrap_key_id,
        fingerprint=row.fingerprint,
        blob=bytes(row.wrapped_dek),
    )


def _policy(row: _Row) -> PolicyRecord:
    return PolicyRecord(
        model_id=row.model_id,
        version=row.version,
        document=row.document,
        digest=row.digest,
        created_at=row.created_at,
    )


_SCOPE_NAMES = frozenset(scope.value for scope in AdminScope)


def _scopes_text(scopes: Iterable[AdminScope | str]) -> str:
    """The stored form of a token's scopes: sorted names, space-separated; at least one."""
    names = sorted({str(scope) for scope in scopes})
    if not names:
        raise ConfigError("an admin token needs at least one scope")
    unknown = [name for name in names if name not in _SCOPE_NAMES]
    if unknown:
        raise ConfigError(f"unknown admin token scope {unknown[0][:64]!r}")
    return " ".join(names)


def _admin_token(row: _Row) -> AdminTokenRecord:
    return AdminTokenRecord(
        token_id=row.token_id,
        name=row.name,
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        # Fail closed: a name this code does not know grants nothing.
        scopes=frozenset(AdminScope(n) for n in str(row.scopes).split() if n in _SCOPE_NAMES),
    )


def _session(row: _Row) -> SessionRecord:
    return SessionRecord(
        token_id=row.token_id,
        hpke_suite=row.hpke_suite,
        public_key=bytes(row.public_key),
        claims_json=row.claims,
        claims_digest=row.claims_digest,
        evidence_digest=row.evidence_digest,
        model_ids=None if row.model_ids is None else tuple(json.loads(row.model_ids)),
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
    )


def _digest(row: _Row) -> bytes:
    return bytes(row.digest)


def _audit(row: _Row) -> AuditRecord:
    return AuditRecord(
        seq=int(row.seq),
        at=t.from_micros(int(row.at)),
        kind=row.kind,
        action=row.action,
        decision=row.decision,
        actor=row.actor,
        client_address=row.client_address,
        request_id=row.request_id,
        evidence_digest=row.evidence_digest,
        claims_json=row.claims,
        model_ids_json=row.model_ids,
        reasons_json=row.reasons,
        details_json=row.details,
        prev_hash=row.prev_hash,
        hash=row.hash,
    )


_KEY_COLUMNS = (
    t.key_versions.c.model_id,
    t.key_versions.c.version,
    t.key_versions.c.state,
    t.key_versions.c.wrap_key_id,
    t.key_versions.c.fingerprint,
    t.key_versions.c.created_at,
    t.key_versions.c.revoked_at,
)
_ADMIN_COLUMNS = tuple(c for c in t.admin_tokens.c if c.name != "digest")
_SESSION_COLUMNS = tuple(c for c in t.sessions.c if c.name != "digest")


def _version_is(model_id: str, version: int) -> sa.ColumnElement[bool]:
    return sa.and_(t.key_versions.c.model_id == model_id, t.key_versions.c.version == version)


def _active_keys(*columns: Any) -> sa.Select[Any]:
    """``columns`` of the active key versions of live (not deleted) models."""
    return (
        sa.select(*columns)
        .join(t.models, t.models.c.model_id == t.key_versions.c.model_id)
        .where(t.key_versions.c.state == KeyState.ACTIVE.value, t.models.c.deleted_at.is_(None))
    )


# Hot-path statements (challenge, release, audit) are built once: constructing SQLAlchemy
# statements costs more than executing them on SQLite.
_ADD_NONCE = sa.insert(t.nonces)
_CONSUME_NONCE = (
    sa.delete(t.nonces)
    .where(t.nonces.c.nonce == sa.bindparam("nonce_value"))
    .returning(t.nonces.c.expires_at)
)
# A group's nonces, consumed in one statement. The rows are locked in nonce order first
# (PostgreSQL), so two replicas consuming overlapping sets (a replayed nonce) cannot deadlock.
_DOOMED_NONCES = (
    sa.select(t.nonces.c.nonce)
    .where(t.nonces.c.nonce.in_(sa.bindparam("nonce_values", expanding=True)))
    .order_by(t.nonces.c.nonce)
    .with_for_update()
    .cte("doomed")
)
_CONSUME_NONCES = (
    sa.delete(t.nonces)
    .where(t.nonces.c.nonce.in_(sa.select(_DOOMED_NONCES.c.nonce)))
    .returning(t.nonces.c.nonce, t.nonces.c.expires_at)
)
_ACTIVE_WRAPPED_KEYS = (
    _active_keys(*_KEY_COLUMNS, t.key_versions.c.wrapped_dek)
    .where(t.key_versions.c.model_id == sa.bindparam("model"))
    .order_by(t.key_versions.c.version)
)
_CURRENT_POLICY = (
    sa.select(t.policies)
    .where(t.policies.c.model_id == sa.bindparam("model"))
    .order_by(t.policies.c.version.desc())
    .limit(1)
)


def _release_statements(restricted: bool) -> tuple[Any, Any, Any]:
    """(models, current policies, active keys) queries of ``release_material``; restricted
    ones take the model ids as the expanding parameter ``ids``."""
    models_query = sa.select(t.models).where(t.models.c.deleted_at.is_(None))
    latest = sa.select(
        t.policies.c.model_id, sa.func.max(t.policies.c.version).label("version")
    ).group_by(t.policies.c.model_id)
    keys_query = _active_keys(*_KEY_COLUMNS, t.key_versions.c.wrapped_dek).order_by(
        t.key_versions.c.model_id, t.key_versions.c.version
    )
    if restricted:
        models_query = models_query.where(
            t.models.c.model_id.in_(sa.bindparam("ids", expanding=True))
        )
        latest = latest.where(t.policies.c.model_id.in_(sa.bindparam("ids", expanding=True)))
        keys_query = keys_query.where(
            t.key_versions.c.model_id.in_(sa.bindparam("ids", expanding=True))
        )
    latest_sub = latest.subquery()
    policies_query = sa.select(t.policies).join(
        latest_sub,
        sa.and_(
            t.policies.c.model_id == latest_sub.c.model_id,
            t.policies.c.version == latest_sub.c.version,
        ),
    )
    return models_query, policies_query, keys_query


_RELEASE_ALL = _release_statements(restricted=False)
_RELEASE_SOME = _release_statements(restricted=True)
_CURRENT_POLICIES = (
    _RELEASE_ALL[1]
    .join(t.models, t.models.c.model_id == t.policies.c.model_id)
    .where(t.models.c.deleted_at.is_(None))
    .order_by(t.policies.c.model_id)
)
# Inside a write transaction: the key rows under a share lock (PostgreSQL; SQLite's write
# transaction excludes every other writer anyway), so a revocation waits for our commit.
_LOCKED_RELEASE = {
    restricted: (models, policies, keys.with_for_update(read=True, of=t.key_versions))
    for restricted, (models, policies, keys) in (
        (False, _RELEASE_ALL),
        (True, _RELEASE_SOME),
    )
}
_STILL_ACTIVE = (
    _active_keys(t.key_versions.c.model_id, t.key_versions.c.version)
    .where(t.key_versions.c.model_id.in_(sa.bindparam("ids", expanding=True)))
    .with_for_update(read=True, of=t.key_versions)
)

_LOCK_AUDIT_HEAD = (
    sa.select(t.audit_head.c.seq, t.audit_head.c.hash)
    .where(t.audit_head.c.id == 1)
    .with_for_update()
)
_INSERT_AUDIT = sa.insert(t.audit_log)
_INSERT_SESSION = sa.insert(t.sessions)
_UPDATE_AUDIT_HEAD = (
    sa.update(t.audit_head)
    .where(t.audit_head.c.id == 1)
    .values(seq=sa.bindparam("new_seq"), hash=sa.bindparam("new_hash"))
)


def _read_release_material(
    conn: sa.Connection, model_ids: Sequence[str] | None, *, locked: bool
) -> list[ReleaseMaterial]:
    """``Store.release_material`` on ``conn`` (``locked``: inside a write transaction)."""
    wanted = None if model_ids is None else list(dict.fromkeys(model_ids))
    if wanted is not None and not wanted:
        return []
    statements = _LOCKED_RELEASE if locked else {False: _RELEASE_ALL, True: _RELEASE_SOME}
    models_query, policies_query, keys_query = statements[wanted is not None]
    params: dict[str, Any] = {} if wanted is None else {"ids": wanted}
    models = {row.model_id: _model(row) for row in conn.execute(models_query, params)}
    policies = {row.model_id: _policy(row) for row in conn.execute(policies_query, params)}
    keys: dict[str, list[WrappedKey]] = {}
    for row in conn.execute(keys_query, params):
        keys.setdefault(row.model_id, []).append(_wrapped_key(row))
    order = wanted if wanted is not None else sorted(models)
    return [
        ReleaseMaterial(
            model_id=model_id,
            model=models.get(model_id),
            policy=policies.get(model_id) if model_id in models else None,
            keys=tuple(keys.get(model_id, ())),
        )
        for model_id in order
    ]


def _audit_row(record: AuditRecord) -> dict[str, Any]:
    return {
        "seq": record.seq,
        "at": record.at_micros,
        "kind": record.kind,
        "action": record.action,
        "decision": record.decision,
        "actor": record.actor,
        "client_address": record.client_address,
        "request_id": record.request_id,
        "evidence_digest": record.evidence_digest,
        "claims": record.claims_json,
        "model_ids": record.model_ids_json,
        "reasons": record.reasons_json,
        "details": record.details_json,
        "prev_hash": record.prev_hash,
        "hash": record.hash,
    }


def _write_audit(
    conn: sa.Connection,
    entries: Sequence[tuple[AuditEntry, Mapping[str, str | None] | None]],
    *,
    at: datetime,
) -> list[AuditRecord]:
    """Append ``(entry, entry.encoded() or None)`` to the chain, in order, under the lock of the
    chain's head row; the records written."""
    head = conn.execute(_LOCK_AUDIT_HEAD).one()
    seq, prev_hash = int(head.seq), str(head.hash)
    records: list[AuditRecord] = []
    for entry, encoded in entries:
        record = build_record(entry, seq=seq + 1, at=at, prev_hash=prev_hash, encoded=encoded)
        records.append(record)
        seq, prev_hash = record.seq, record.hash
    conn.execute(_INSERT_AUDIT, [_audit_row(record) for record in records])
    conn.execute(_UPDATE_AUDIT_HEAD, {"new_seq": seq, "new_hash": prev_hash})
    return records


def _nonce_row(nonce: bytes, *, created_at: datetime, expires_at: datetime) -> dict[str, Any]:
    if not 16 <= len(nonce) <= 64:
        raise ValueError("a nonce is 16 to 64 bytes")
    return {"nonce": bytes(nonce), "created_at": utc(created_at), "expires_at": utc(expires_at)}


def _nonce_status(expires_at: datetime | None, *, now: datetime) -> NonceStatus:
    """The outcome of consuming a nonce, from the deleted row's expiry (``None``: no row)."""
    if expires_at is None:
        return NonceStatus.UNKNOWN
    if utc(now) >= expires_at:
        return NonceStatus.EXPIRED
    return NonceStatus.CONSUMED


def _check_token_fields(token_id: str, digest: bytes) -> None:
    if not _TOKEN_ID.fullmatch(token_id):
        raise ConfigError("a token id is 16 lowercase hex characters")
    if len(digest) != 32:
        raise ConfigError("a token digest is 32 bytes (SHA-256)")


# --- the transactions -------------------------------------------------------------------------


class _Transaction(ABC):
    """What both transactions share: connection, clock and ``create_session`` (a session row is
    inserted at once by a :class:`_SqlTransaction`, buffered by a :class:`_GroupTransaction`)."""

    def __init__(self, conn: sa.Connection, clock: Callable[[], datetime]) -> None:
        self._conn = conn
        self._clock = clock

    def _now(self) -> datetime:
        return utc(self._clock())

    @abstractmethod
    def _change(self) -> None:
        """Called before each change (a :class:`_SqlTransaction` refuses one after its audit
        record; a group writes its audit records last anyway)."""

    @abstractmethod
    def _store_session(self, row: dict[str, Any]) -> None:
        """Write (or buffer) a new session row."""

    def create_session(
        self,
        *,
        token_id: str,
        digest: bytes,
        hpke_suite: str,
        public_key: bytes,
        claims_json: str,
        evidence_digest: str | None,
        model_ids: Sequence[str] | None,
        expires_at: datetime,
    ) -> SessionRecord:
        self._change()
        _check_token_fields(token_id, digest)
        try:
            claims = json.loads(claims_json)
        except (TypeError, ValueError) as exc:
            raise ConfigError("session claims must be JSON text") from exc
        if not isinstance(claims, dict):
            raise ConfigError("session claims must be a JSON object")
        ids = None if model_ids is None else tuple(check_model_id(m) for m in model_ids)
        record = SessionRecord(
            token_id=token_id,
            hpke_suite=hpke_suite,
            public_key=bytes(public_key),
            claims_json=claims_json,
            claims_digest=hashlib.sha256(claims_json.encode("utf-8")).hexdigest(),
            evidence_digest=evidence_digest,
            model_ids=ids,
            created_at=self._now(),
            expires_at=utc(expires_at),
        )
        self._store_session(
            {
                "token_id": token_id,
                "digest": bytes(digest),
                "hpke_suite": hpke_suite,
                "public_key": record.public_key,
                "claims": claims_json,
                "claims_digest": record.claims_digest,
                "evidence_digest": evidence_digest,
                "model_ids": None if ids is None else json.dumps(list(ids)),
                "created_at": record.created_at,
                "expires_at": record.expires_at,
            }
        )
        return record


class _SqlTransaction(_Transaction):
    """A write transaction (see ``StoreTransaction``)."""

    def __init__(self, conn: sa.Connection, clock: Callable[[], datetime]) -> None:
        super().__init__(conn, clock)
        self.changed = False
        self.audited = False

    def _change(self) -> None:
        if self.audited:
            raise AuditError(
                "internal error: a change after the audit record in one transaction; the audit "
                "record must be the last write (nothing was committed)"
            )
        self.changed = True

    def _lock_live_model(self, model_id: str) -> ModelRecord:
        row = self._conn.execute(
            sa.select(t.models).where(t.models.c.model_id == model_id).with_for_update()
        ).first()
        if row is None or row.deleted_at is not None:
            raise NotFoundError(f"model {model_id!r} does not exist")
        return _model(row)

    def _insert_key(self, model_id: str, version: int, wrapped: WrappedDek) -> KeyVersionRecord:
        if not wrapped.blob:
            raise TypeError("wrap() must return a WrappedDek with the wrapped key")
        now = self._now()
        values = {
            "model_id": model_id,
            "version": version,
            "state": KeyState.ACTIVE.value,
            "wrapped_dek": wrapped.blob,
            "wrap_key_id": wrapped.wrap_key_id,
            "fingerprint": wrapped.fingerprint,
            "created_at": now,
            "revoked_at": None,
        }
        try:
            self._conn.execute(sa.insert(t.key_versions).values(**values))
        except sa_exc.IntegrityError as exc:
            raise ConflictError(
                f"key version {version} of model {model_id!r} was created concurrently; retry"
            ) from exc
        return KeyVersionRecord(
            model_id=model_id,
            version=version,
            state=KeyState.ACTIVE,
            wrap_key_id=wrapped.wrap_key_id,
            fingerprint=wrapped.fingerprint,
            created_at=now,
        )

    # -- models and keys --

    def create_model(
        self, model_id: str, *, wrap: WrapFunction
    ) -> tuple[ModelRecord, KeyVersionRecord]:
        check_model_id(model_id)
        self._change()
        existing = self._conn.execute(
            sa.select(t.models.c.deleted_at).where(t.models.c.model_id == model_id)
        ).first()
        if existing is not None:
            if existing.deleted_at is not None:
                raise ConflictError(
                    f"model id {model_id!r} belonged to a deleted model; ids are never reused "
                    "(old sealed files name it), choose another id"
                )
            raise ConflictError(f"model {model_id!r} already exists")
        now = self._now()
        try:
            self._conn.execute(sa.insert(t.models).values(model_id=model_id, created_at=now))
        except sa_exc.IntegrityError as exc:
            raise ConflictError(f"model {model_id!r} already exists") from exc
        key = self._insert_key(model_id, 1, wrap(1))
        return ModelRecord(model_id=model_id, created_at=now), key

    def add_key_version(self, model_id: str, *, wrap: WrapFunction) -> KeyVersionRecord:
        self._change()
        self._lock_live_model(model_id)
        highest = self._conn.execute(
            sa.select(sa.func.max(t.key_versions.c.version)).where(
                t.key_versions.c.model_id == model_id
            )
        ).scalar()
        version = int(highest or 0) + 1
        return self._insert_key(model_id, version, wrap(version))

    def _locked_version(self, model_id: str, version: int) -> KeyVersionRecord:
        self._lock_live_model(model_id)
        row = self._conn.execute(
            sa.select(*_KEY_COLUMNS).where(_version_is(model_id, version)).with_for_update()
        ).first()
        if row is None:
            raise NotFoundError(f"model {model_id!r} has no key version {version}")
        return _key_version(row)

    def _update_version(self, record: KeyVersionRecord, **values: Any) -> None:
        self._conn.execute(
            sa.update(t.key_versions)
            .where(_version_is(record.model_id, record.version))
            .values(**values)
        )

    def revoke_key_version(self, model_id: str, version: int) -> KeyVersionRecord:
        self._change()
        record = self._locked_version(model_id, version)
        if record.state is not KeyState.ACTIVE:
            raise ConflictError(f"key version {version} of {model_id!r} is already {record.state}")
        now = self._now()
        self._update_version(record, state=KeyState.REVOKED.value, revoked_at=now)
        return replace(record, state=KeyState.REVOKED, revoked_at=now)

    def replace_wrapped_key(
        self, model_id: str, version: int, *, blob: bytes, wrap_key_id: str
    ) -> KeyVersionRecord:
        self._change()
        record = self._locked_version(model_id, version)
        if record.state is KeyState.DESTROYED or not blob:
            raise ConflictError(f"key version {version} of {model_id!r} was destroyed")
        self._update_version(record, wrapped_dek=bytes(blob), wrap_key_id=wrap_key_id)
        return replace(record, wrap_key_id=wrap_key_id)

    def delete_model(self, model_id: str) -> ModelRecord:
        self._change()
        model = self._lock_live_model(model_id)
        now = self._now()
        self._conn.execute(
            sa.update(t.models).where(t.models.c.model_id == model_id).values(deleted_at=now)
        )
        self._conn.execute(
            sa.update(t.key_versions)
            .where(t.key_versions.c.model_id == model_id)
            .values(
                state=KeyState.DESTROYED.value,
                wrapped_dek=None,
                revoked_at=sa.func.coalesce(
                    t.key_versions.c.revoked_at, sa.literal(now, t.UtcMicros())
                ),
            )
        )
        return ModelRecord(model_id=model_id, created_at=model.created_at, deleted_at=now)

    # -- policies --

    def set_policy(self, model_id: str, document: str) -> PolicyRecord:
        self._change()
        try:
            parsed = json.loads(document)
        except (TypeError, ValueError) as exc:
            raise ConfigError("a stored policy document must be JSON text") from exc
        if not isinstance(parsed, dict):
            raise ConfigError("a stored policy document must be a JSON object")
        self._lock_live_model(model_id)
        highest = self._conn.execute(
            sa.select(sa.func.max(t.policies.c.version)).where(t.policies.c.model_id == model_id)
        ).scalar()
        record = PolicyRecord(
            model_id=model_id,
            version=int(highest or 0) + 1,
            document=document,
            digest=hashlib.sha256(document.encode("utf-8")).hexdigest(),
            created_at=self._now(),
        )
        self._conn.execute(
            sa.insert(t.policies).values(
                model_id=record.model_id,
                version=record.version,
                document=record.document,
                digest=record.digest,
                created_at=record.created_at,
            )
        )
        return record

    # -- tokens and sessions --

    def create_admin_token(
        self,
        *,
        token_id: str,
        digest: bytes,
        name: str,
        scopes: Iterable[AdminScope],
        expires_at: datetime | None = None,
    ) -> AdminTokenRecord:
        self._change()
        _check_token_fields(token_id, digest)
        if not 0 < len(name) <= 200:
            raise ConfigError("a token name is 1 to 200 characters")
        scopes_text = _scopes_text(scopes)
        record = AdminTokenRecord(
            token_id=token_id,
            name=name,
            created_at=self._now(),
            expires_at=None if expires_at is None else utc(expires_at),
            scopes=frozenset(AdminScope(n) for n in scopes_text.split()),
        )
        try:
            self._conn.execute(
                sa.insert(t.admin_tokens).values(
                    token_id=token_id,
                    digest=bytes(digest),
                    name=name,
                    created_at=record.created_at,
                    expires_at=record.expires_at,
                    scopes=scopes_text,
                )
            )
        except sa_exc.IntegrityError as exc:
            raise ConflictError(f"admin token {token_id} already exists") from exc
        return record

    def _revoke_token(
        self, table: sa.Table, columns: Sequence[Any], token_id: str, *, what: str
    ) -> tuple[_Row, datetime]:
        """Mark the ``what`` (admin token or session) revoked: its row before, and the time."""
        self._change()
        row = self._conn.execute(
            sa.select(*columns).where(table.c.token_id == token_id).with_for_update()
        ).first()
        if row is None:
            raise NotFoundError(f"there is no {what} {token_id!r}")
        if row.revoked_at is not None:
            raise ConflictError(f"{what} {token_id} is already revoked")
        now = self._now()
        self._conn.execute(
            sa.update(table).where(table.c.token_id == token_id).values(revoked_at=now)
        )
        return row, now

    def revoke_admin_token(self, token_id: str) -> AdminTokenRecord:
        row, now = self._revoke_token(t.admin_tokens, _ADMIN_COLUMNS, token_id, what="admin token")
        return replace(_admin_token(row), revoked_at=now)

    def _store_session(self, row: dict[str, Any]) -> None:
        try:
            self._conn.execute(_INSERT_SESSION, row)
        except sa_exc.IntegrityError as exc:
            raise ConflictError(f"session {row['token_id']} already exists") from exc

    def revoke_session(self, token_id: str) -> SessionRecord:
        row, now = self._revoke_token(t.sessions, _SESSION_COLUMNS, token_id, what="session")
        return replace(_session(row), revoked_at=now)

    def still_active(self, keys: Sequence[tuple[str, int]]) -> frozenset[tuple[str, int]]:
        if self.audited:
            raise AuditError("internal error: still_active() must come before the audit record")
        wanted = set(keys)
        if not wanted:
            return frozenset()
        model_ids = sorted({model_id for model_id, _ in wanted})
        rows = self._conn.execute(_STILL_ACTIVE, {"ids": model_ids})
        return frozenset((row.model_id, row.version) for row in rows) & wanted

    # -- audit --

    def append_audit(self, entry: AuditEntry) -> AuditRecord:
        try:
            [record] = _write_audit(self._conn, [(entry, None)], at=self._now())
        except sa_exc.SQLAlchemyError as exc:
            raise AuditError(
                f"the audit record could not be written ({_first_line(exc)}); nothing was committed"
            ) from exc
        self.audited = True
        return record


class _GroupTransaction(_Transaction):
    """The transaction shared by one group of submitted work (see ``Store.submit``).

    Reads and the nonce deletion run at once; new nonces, sessions and audit records are
    buffered and written by :meth:`flush` just before the commit, the audit records last and
    under the chain lock (one lock order for every writer). :meth:`mark` / :meth:`undo` drop
    what one unit of work buffered when it fails.
    """

    def __init__(
        self, conn: sa.Connection, clock: Callable[[], datetime], nonces: Sequence[bytes] = ()
    ) -> None:
        super().__init__(conn, clock)
        # The nonces the group's work declared: consumed up front, in one statement.
        self._declared = frozenset(bytes(n) for n in nonces)
        self._consumed: dict[bytes, datetime] = {}
        if self._declared:
            rows = conn.execute(_CONSUME_NONCES, {"nonce_values": sorted(self._declared)})
            self._consumed = {bytes(row.nonce): row.expires_at for row in rows}
        self._nonces: list[dict[str, Any]] = []
        self._sessions: list[dict[str, Any]] = []
        self._entries: list[tuple[AuditEntry, dict[str, str | None]]] = []
        self._material: dict[tuple[str, ...] | None, list[ReleaseMaterial]] = {}
        self.records: list[AuditRecord] = []

    def _change(self) -> None:
        """Nothing to check: :meth:`flush` writes the audit records after everything else."""

    def add_nonce(self, nonce: bytes, *, expires_at: datetime) -> None:
        self._nonces.append(_nonce_row(nonce, created_at=self._clock(), expires_at=expires_at))

    def consume_nonce(self, nonce: bytes, *, now: datetime) -> NonceStatus:
        nonce = bytes(nonce)
        if nonce in self._declared:
            expires_at = self._consumed.pop(nonce, None)  # a second use in the group: unknown
        else:
            row = self._conn.execute(_CONSUME_NONCE, {"nonce_value": nonce}).first()
            expires_at = None if row is None else row.expires_at
        return _nonce_status(expires_at, now=now)

    def release_material(self, model_ids: Sequence[str] | None) -> list[ReleaseMaterial]:
        # Nothing in a group changes models, keys or policies: one read per distinct request.
        key = None if model_ids is None else tuple(model_ids)
        material = self._material.get(key)
        if material is None:
            material = _read_release_material(self._conn, model_ids, locked=True)
            self._material[key] = material
        return material

    def _store_session(self, row: dict[str, Any]) -> None:
        self._sessions.append(row)

    def append_audit(self, entry: AuditEntry) -> None:
        # Encode now: a malformed entry fails its own unit of work, not the group.
        self._entries.append((entry, entry.encoded()))

    def mark(self) -> tuple[int, int, int]:
        return len(self._nonces), len(self._sessions), len(self._entries)

    def undo(self, mark: tuple[int, int, int]) -> None:
        del self._nonces[mark[0] :]
        del self._sessions[mark[1] :]
        del self._entries[mark[2] :]

    def flush(self) -> None:
        """Write what was buffered; the audit records last, under the chain lock."""
        if self._nonces:
            try:
                self._conn.execute(_ADD_NONCE, self._nonces)
            except sa_exc.IntegrityError as exc:  # pragma: no cover - 256-bit random nonces
                raise ConflictError("a nonce was issued twice; retry") from exc
        if self._sessions:
            self._conn.execute(_INSERT_SESSION, self._sessions)
        if not self._entries:
            return
        try:
            self.records = _write_audit(self._conn, self._entries, at=self._now())
        except sa_exc.SQLAlchemyError as exc:
            raise AuditError(
                f"the audit records could not be written ({_first_line(exc)}); nothing was "
                "committed"
            ) from exc


@dataclass(frozen=True, slots=True)
class _Work:
    function: Callable[[Any], Any]
    durable: bool
    future: Future[Any]
    nonce: bytes | None = None


class _GroupCommitter:
    """One thread that commits submitted work in groups (group commit).

    Work submitted while a group is being committed waits for the next group, so under load
    many requests share one transaction and one disk flush, and at low load a request is
    committed at once (no timer). The committer first takes the store's write lock, then takes
    every waiting unit of work (up to ``_MAX_GROUP``), runs each in order on one transaction
    (:class:`_GroupTransaction`), flushes and commits, and only then completes the futures:
    a caller learns its result only once it is durable (or that nothing was committed).
    """

    def __init__(self, store: SqlStore) -> None:
        self._store = store
        self._pending: list[_Work] = []
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(
        self, function: Callable[[Any], _T], *, durable: bool, nonce: bytes | None
    ) -> Future[_T]:
        future: Future[_T] = Future()
        with self._condition:
            if self._closed:
                raise StorageError("the key store is closed")
            self._pending.append(_Work(function, durable, future, nonce))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="sealtorch-keystore-commit", daemon=True
                )
                self._thread.start()
            self._condition.notify()
        return future

    def _take(self) -> list[_Work]:
        """Up to ``_MAX_GROUP`` waiting units; those whose caller gave up are dropped (a taken
        unit can no longer be cancelled: its caller waits for the outcome)."""
        with self._condition:
            waiting = self._pending[:_MAX_GROUP]
            del self._pending[:_MAX_GROUP]
        return [work for work in waiting if work.future.set_running_or_notify_cancel()]

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._pending and not self._closed:
                    self._condition.wait()
                if not self._pending:
                    return
            self._store._commit_group(self._take)

    def close(self, timeout: float = 30.0) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        with self._condition:
            left, self._pending = self._pending, []
        for work in left:
            if work.future.set_running_or_notify_cancel():
                work.future.set_exception(StorageError("the key store was closed"))


# --- the store --------------------------------------------------------------------------------


class _SqliteWriteLock:
    """Serialises SQLite writers: a thread lock, then an exclusive ``flock`` on ``DB.lock``
    (other processes: ``--workers``). A writer that waits longer than the busy timeout gets a
    StorageError. A killed holder's ``flock`` is released by the kernel."""

    def __init__(self, database: Path, timeout: float) -> None:
        self._thread_lock = threading.RLock()
        self._path = database.with_name(database.name + ".lock")
        self._timeout = timeout
        self._fd: int | None = None
        self._depth = 0

    def __enter__(self) -> None:
        self._acquire(patient=False)

    @contextmanager
    def patient(self) -> Iterator[None]:
        """The lock for the group committer: it waits for another process without polling
        (the kernel wakes it the moment the holder lets go, so two worker processes take turns
        instead of one starving while it sleeps between polls) and without a time limit — its
        callers time out on their own and withdraw the work that has not started."""
        self._acquire(patient=True)
        try:
            yield
        finally:
            self.__exit__()

    def _acquire(self, *, patient: bool) -> None:
        if not self._thread_lock.acquire(timeout=self._timeout):
            raise StorageError("the key store is busy (timed out waiting for the write lock)")
        self._depth += 1
        if self._depth > 1:
            return
        try:
            if self._fd is None:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            if patient:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            else:
                _flock(self._fd, self._timeout)
        except BaseException:
            self._depth -= 1
            self._thread_lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        try:
            if self._depth == 0 and self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()


def _flock(fd: int, timeout: float) -> None:
    """Take the exclusive lock, retrying every 0.1-2 ms (not SQLite's up-to-100 ms sleeps)."""
    deadline = time.monotonic() + timeout
    delay = 0.0001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise StorageError(
                    "the key store is busy (another process held the write lock too long)"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 0.002)


class SqlStore:
    """SQLite or PostgreSQL through SQLAlchemy (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], datetime] | None = None,
        busy_timeout: float = 10.0,
        sqlite_synchronous: str = "FULL",
        pool_size: int = 10,
    ) -> None:
        self._clock = clock or _system_clock
        try:
            parsed = sa.engine.make_url(url)
        except sa_exc.ArgumentError as exc:
            raise ConfigError(
                "the store URL is not valid; use sqlite:///PATH or "
                "postgresql+psycopg://USER:PASSWORD@HOST/DB"
            ) from exc
        backend = parsed.get_backend_name()
        timeout_ms = max(1, int(busy_timeout * 1000))
        if backend == "sqlite":
            self._engine = self._sqlite_engine(parsed, timeout_ms, sqlite_synchronous.upper())
        elif backend == "postgresql":
            if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg2"):
                parsed = parsed.set(drivername="postgresql+psycopg")
            if parsed.drivername != "postgresql+psycopg":
                raise ConfigError(
                    "PostgreSQL store URLs use the psycopg 3 driver: postgresql+psycopg://"
                )
            self._engine = sa.create_engine(
                parsed,
                hide_parameters=True,
                pool_pre_ping=True,
                pool_size=pool_size,
                max_overflow=pool_size,
                connect_args={"options": f"-c lock_timeout={timeout_ms}"},
            )
        else:
            raise ConfigError(
                f"unsupported store backend {backend!r}; use sqlite:///PATH or "
                "postgresql+psycopg://..."
            )
        self._backend = backend
        self._synchronous = sqlite_synchronous.upper()
        self._description = parsed.render_as_string(hide_password=True)
        # SQLite has one writer at a time. Writers (threads, and processes sharing the file)
        # queue on a lock instead of in SQLite's busy handler, whose sleeps (up to 100 ms each)
        # make a long latency tail under concurrent requests.
        self._sqlite_lock = (
            _SqliteWriteLock(Path(str(parsed.database)), busy_timeout)
            if backend == "sqlite"
            else None
        )
        self._write_lock: AbstractContextManager[Any] = (
            self._sqlite_lock or contextlib.nullcontext()
        )
        self._committer = _GroupCommitter(self)

    @staticmethod
    def _sqlite_engine(parsed: sa.URL, timeout_ms: int, synchronous: str) -> sa.Engine:
        database = parsed.database
        if not database or database == ":memory:" or database.startswith("file:"):
            raise ConfigError(
                "the SQLite store must be a file (sqlite:///PATH); an in-memory database would "
                "lose every key when the server stops"
            )
        if synchronous not in _SYNC_MODES:
            raise ConfigError(f"sqlite_synchronous must be one of {', '.join(_SYNC_MODES)}")
        path = Path(database)
        if not path.parent.is_dir():
            raise ConfigError(f"the directory of the SQLite store {path} does not exist")
        try:  # create the file ourselves so it is private (SQLite would use the umask)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
        except OSError as exc:
            raise ConfigError(f"cannot create the SQLite store {path}: {exc.strerror}") from exc
        engine = sa.create_engine(parsed, hide_parameters=True)

        @event.listens_for(engine, "connect")
        def _configure(dbapi_connection: Any, connection_record: Any) -> None:
            del connection_record
            dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(f"PRAGMA busy_timeout = {timeout_ms}")
                cursor.execute("PRAGMA journal_mode = WAL")
                cursor.execute("PRAGMA foreign_keys = ON")
                cursor.execute(f"PRAGMA synchronous = {synchronous}")
            finally:
                cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: sa.Connection) -> None:
            immediate = conn.get_execution_options().get(_WRITE, False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine

    # -- plumbing --

    @property
    def backend(self) -> str:
        return self._backend

    def __repr__(self) -> str:
        return f"SqlStore({self._description!r})"

    def _fail(self, exc: sa_exc.SQLAlchemyError, what: str) -> NoReturn:
        raise StorageError(
            f"the key store ({self._backend}) failed while {what} ({_first_line(exc)}); check "
            "that the database is reachable and not locked by another program"
        ) from exc

    @contextmanager
    def _read(self, what: str) -> Iterator[sa.Connection]:
        try:
            with self._engine.connect() as conn:
                yield conn
        except sa_exc.SQLAlchemyError as exc:
            self._fail(exc, what)

    def _one(
        self, what: str, convert: Callable[[_Row], _T], query: Any, params: Any = None
    ) -> _T | None:
        """The first row of ``query`` as ``convert`` makes it, or ``None`` if there is none."""
        with self._read(what) as conn:
            row = conn.execute(query, params).first()
        return None if row is None else convert(row)

    def _all(
        self, what: str, convert: Callable[[_Row], _T], query: Any, params: Any = None
    ) -> list[_T]:
        with self._read(what) as conn:
            return [convert(row) for row in conn.execute(query, params)]

    @contextmanager
    def _begin_write(self, *, durable: bool = True) -> Iterator[sa.Connection]:
        """A connection in a write transaction (the caller holds the write lock).

        ``durable=False`` (challenge nonces only) commits without waiting for the disk: SQLite
        ``synchronous=NORMAL`` / PostgreSQL ``synchronous_commit = off`` for that transaction.
        Losing such a commit in a power cut is harmless: an issued nonce is lost (the client
        asks again), and a consumed nonce is always followed, in the same request, by a durable
        audit commit that flushes the log up to and including it."""
        relaxed = not durable and self._backend == "sqlite" and self._synchronous != "NORMAL"
        with self._engine.connect().execution_options(**{_WRITE: True}) as conn:
            if relaxed:
                conn.connection.dbapi_connection.execute(  # type: ignore[union-attr]
                    "PRAGMA synchronous = NORMAL"
                )
            try:
                with conn.begin():
                    if not durable and self._backend == "postgresql":
                        conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
                    yield conn
            finally:
                if relaxed:
                    try:
                        conn.connection.dbapi_connection.execute(  # type: ignore[union-attr]
                            f"PRAGMA synchronous = {self._synchronous}"
                        )
                    except sqlite3.Error:  # never return a relaxed connection to the pool
                        conn.invalidate()
                        raise

    @contextmanager
    def _write(self, what: str, *, durable: bool = True) -> Iterator[sa.Connection]:
        """A write transaction of its own (see :meth:`_begin_write` for ``durable``)."""
        try:
            with self._write_lock, self._begin_write(durable=durable) as conn:
                yield conn
        except sa_exc.SQLAlchemyError as exc:
            self._fail(exc, what)

    @contextmanager
    def transaction(self) -> Iterator[_SqlTransaction]:
        tx: _SqlTransaction | None = None
        try:
            with self._write_lock, self._begin_write() as conn:
                tx = _SqlTransaction(conn, self._clock)
                yield tx
                if tx.changed and not tx.audited:
                    raise AuditError(
                        "internal error: a state change without an audit record; it was rolled "
                        "back (every change must be audited in the same transaction)"
                    )
        except sa_exc.SQLAlchemyError as exc:
            if tx is not None and tx.audited:
                raise AuditError(
                    f"the audit record could not be committed ({_first_line(exc)}); nothing was "
                    "committed"
                ) from exc
            self._fail(exc, "writing")

    def submit(
        self, work: Callable[[Any], _T], *, durable: bool = True, nonce: bytes | None = None
    ) -> Future[_T]:
        return self._committer.submit(work, durable=durable, nonce=nonce)

    def _commit_group(self, take: Callable[[], list[_Work]]) -> None:
        """Commit one group (the committer thread's body; see :class:`_GroupCommitter`)."""
        group: list[_Work] = []
        outcomes: list[tuple[_Work, bool, Any]] = []
        try:
            # SQLite: the write lock before taking the group, so that it grows meanwhile.
            with self._sqlite_lock.patient() if self._sqlite_lock else contextlib.nullcontext():
                group = take()
                if group:
                    self._run_group(group, outcomes)
        except (sa_exc.SQLAlchemyError, StorageError) as exc:
            self._fail_group(group or take(), exc)
            return
        except Exception as exc:  # noqa: BLE001 - the committer must survive; callers learn it
            _log.error("group commit failed unexpectedly: %s", type(exc).__name__)
            self._fail_group(group or take(), exc)
            return
        for work, ok, value in outcomes:
            if ok:
                work.future.set_result(value)
            else:
                work.future.set_exception(value)

    def _run_group(self, group: list[_Work], outcomes: list[tuple[_Work, bool, Any]]) -> None:
        tx: _GroupTransaction | None = None
        try:
            with self._begin_write(durable=any(work.durable for work in group)) as conn:
                nonces = [work.nonce for work in group if work.nonce is not None]
                tx = _GroupTransaction(conn, self._clock, nonces)
                for work in group:
                    mark = tx.mark()
                    try:
                        outcomes.append((work, True, work.function(tx)))
                    except sa_exc.SQLAlchemyError:
                        raise  # the transaction is broken: the whole group fails
                    except Exception as exc:  # noqa: BLE001 - handed to that caller
                        tx.undo(mark)
                        outcomes.append((work, False, exc))
                tx.flush()
        except sa_exc.SQLAlchemyError as exc:
            if tx is not None and tx.records:
                raise AuditError(
                    f"the audit records could not be committed ({_first_line(exc)}); "
                    "nothing was committed"
                ) from exc
            raise

    def _fail_group(self, group: list[_Work], exc: BaseException) -> None:
        """Every caller of a failed group gets its own error (nothing of it was committed)."""
        for work in group:
            error: StorageError
            if isinstance(exc, AuditError):
                error = AuditError(str(exc))
            elif isinstance(exc, StorageError):
                error = StorageError(str(exc))
            elif isinstance(exc, sa_exc.SQLAlchemyError):
                error = StorageError(
                    f"the key store ({self._backend}) failed while committing "
                    f"({_first_line(exc)}); check that the database is reachable"
                )
            else:
                error = StorageError("the key store failed while committing (internal error)")
            error.__cause__ = exc
            work.future.set_exception(error)

    # -- lifecycle --

    def migrate(self) -> int:
        with self._write("migrating the schema") as conn:
            version = run_migrations(conn, now=utc(self._clock()))
        _log.info("key store schema is at version %d", version)
        return version

    def schema_version(self) -> int:
        with self._read("reading the schema version") as conn:
            return applied_version(conn)

    def check_schema(self) -> None:
        current = self.schema_version()
        expected = latest_version()
        if current != expected:
            raise StorageError(
                f"the key store schema is version {current}, but this sealtorch needs version "
                f"{expected}; migrate it first (Store.migrate — `sealtorch keyserver init` and "
                "`serve` do this)"
                if current < expected
                else f"the key store schema is version {current}, newer than this sealtorch "
                f"({expected}); upgrade sealtorch"
            )

    def ping(self) -> None:
        with self._read("answering a health check") as conn:
            conn.execute(sa.text("SELECT 1")).scalar()

    def close(self) -> None:
        self._committer.close()
        self._engine.dispose()

    # -- models and keys --

    def get_model(self, model_id: str, *, include_deleted: bool = False) -> ModelRecord | None:
        query = sa.select(t.models).where(t.models.c.model_id == model_id)
        if not include_deleted:
            query = query.where(t.models.c.deleted_at.is_(None))
        return self._one("reading a model", _model, query)

    def list_models(self, *, include_deleted: bool = False) -> list[ModelRecord]:
        query = sa.select(t.models).order_by(t.models.c.model_id)
        if not include_deleted:
            query = query.where(t.models.c.deleted_at.is_(None))
        return self._all("listing models", _model, query)

    def list_key_versions(self, model_id: str) -> list[KeyVersionRecord]:
        query = (
            sa.select(*_KEY_COLUMNS)
            .where(t.key_versions.c.model_id == model_id)
            .order_by(t.key_versions.c.version)
        )
        return self._all("listing key versions", _key_version, query)

    def get_key_version(self, model_id: str, version: int) -> KeyVersionRecord | None:
        query = sa.select(*_KEY_COLUMNS).where(_version_is(model_id, version))
        return self._one("reading a key version", _key_version, query)

    def current_key_version(self, model_id: str) -> KeyVersionRecord | None:
        query = (
            _active_keys(*_KEY_COLUMNS)
            .where(t.key_versions.c.model_id == model_id)
            .order_by(t.key_versions.c.version.desc())
            .limit(1)
        )
        return self._one("reading the current key version", _key_version, query)

    def get_wrapped_key(self, model_id: str, version: int) -> WrappedKey | None:
        query = sa.select(*_KEY_COLUMNS, t.key_versions.c.wrapped_dek).where(
            _version_is(model_id, version), t.key_versions.c.state != KeyState.DESTROYED.value
        )
        return self._one("reading a wrapped key", _wrapped_key, query)

    def active_wrapped_keys(self, model_id: str) -> list[WrappedKey]:
        return self._all(
            "reading wrapped keys", _wrapped_key, _ACTIVE_WRAPPED_KEYS, {"model": model_id}
        )

    def release_material(self, model_ids: Sequence[str] | None) -> list[ReleaseMaterial]:
        with self._read("reading release material") as conn:
            return _read_release_material(conn, model_ids, locked=False)

    # -- policies --

    def current_policy(self, model_id: str) -> PolicyRecord | None:
        return self._one("reading a policy", _policy, _CURRENT_POLICY, {"model": model_id})

    def current_policies(self) -> list[PolicyRecord]:
        return self._all("reading the current policies", _policy, _CURRENT_POLICIES)

    def get_policy(self, model_id: str, version: int) -> PolicyRecord | None:
        query = sa.select(t.policies).where(
            t.policies.c.model_id == model_id, t.policies.c.version == version
        )
        return self._one("reading a policy", _policy, query)

    def list_policies(self, model_id: str) -> list[PolicyRecord]:
        query = (
            sa.select(t.policies)
            .where(t.policies.c.model_id == model_id)
            .order_by(t.policies.c.version)
        )
        return self._all("listing policies", _policy, query)

    # -- nonces --

    def add_nonce(self, nonce: bytes, *, expires_at: datetime) -> None:
        row = _nonce_row(nonce, created_at=self._clock(), expires_at=expires_at)
        try:
            with self._write("storing a nonce", durable=False) as conn:
                conn.execute(_ADD_NONCE, row)
        except StorageError as exc:
            if isinstance(exc.__cause__, sa_exc.IntegrityError):
                raise ConflictError("this nonce was already issued") from exc.__cause__
            raise

    def consume_nonce(self, nonce: bytes, *, now: datetime) -> NonceStatus:
        with self._write("consuming a nonce", durable=False) as conn:
            row = conn.execute(_CONSUME_NONCE, {"nonce_value": bytes(nonce)}).first()
        return _nonce_status(None if row is None else row.expires_at, now=now)

    def purge_expired(self, *, now: datetime) -> int:
        moment = utc(now)
        with self._write("purging expired nonces and sessions") as conn:
            gone = conn.execute(sa.delete(t.nonces).where(t.nonces.c.expires_at <= moment))
            ended = conn.execute(sa.delete(t.sessions).where(t.sessions.c.expires_at <= moment))
            return int(gone.rowcount or 0) + int(ended.rowcount or 0)

    # -- tokens and sessions --

    def get_admin_token(self, token_id: str) -> AdminTokenRecord | None:
        query = sa.select(*_ADMIN_COLUMNS).where(t.admin_tokens.c.token_id == token_id)
        return self._one("reading an admin token", _admin_token, query)

    def admin_token_digest(self, token_id: str) -> bytes | None:
        query = sa.select(t.admin_tokens.c.digest).where(t.admin_tokens.c.token_id == token_id)
        return self._one("reading an admin token", _digest, query)

    def list_admin_tokens(self) -> list[AdminTokenRecord]:
        query = sa.select(*_ADMIN_COLUMNS).order_by(t.admin_tokens.c.created_at)
        return self._all("listing admin tokens", _admin_token, query)

    def get_session(self, token_id: str) -> SessionRecord | None:
        query = sa.select(*_SESSION_COLUMNS).where(t.sessions.c.token_id == token_id)
        return self._one("reading a session", _session, query)

    def session_digest(self, token_id: str) -> bytes | None:
        query = sa.select(t.sessions.c.digest).where(t.sessions.c.token_id == token_id)
        return self._one("reading a session", _digest, query)

    # -- audit --

    def append_audit(self, entry: AuditEntry) -> AuditRecord:
        try:
            with self.transaction() as tx:
                return tx.append_audit(entry)
        except AuditError:
            raise
        except StorageError as exc:  # e.g. the database is locked or gone before the append
            raise AuditError(f"the audit record could not be written: {exc}") from exc

    def audit_head(self) -> AuditHead:
        query = sa.select(t.audit_head.c.seq, t.audit_head.c.hash).where(t.audit_head.c.id == 1)
        with self._read("reading the audit head") as conn:
            row = conn.execute(query).one()
        return AuditHead(seq=int(row.seq), hash=row.hash)

    def iter_audit(
        self, *, after_seq: int = 0, up_to_seq: int | None = None
    ) -> Iterator[AuditRecord]:
        last = after_seq
        while True:
            query = (
                sa.select(t.audit_log)
                .where(t.audit_log.c.seq > last)
                .order_by(t.audit_log.c.seq)
                .limit(_AUDIT_BATCH)
            )
            if up_to_seq is not None:
                query = query.where(t.audit_log.c.seq <= up_to_seq)
            batch = self._all("reading the audit log", _audit, query)
            yield from batch
            if len(batch) < _AUDIT_BATCH:
                return
            last = batch[-1].seq
