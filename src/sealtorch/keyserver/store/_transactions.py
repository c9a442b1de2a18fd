"""The store's two kinds of transaction: :class:`SqlTransaction` (``Store.transaction()``, one
admin change and its audit record) and :class:`GroupTransaction` (the transaction one group of
submitted work shares; see ``_group_commit``).
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from sealtorch.errors import AuditError, ConfigError
from sealtorch.keyserver.records import (
    AdminTokenRecord,
    ConflictError,
    KeyState,
    KeyVersionRecord,
    ModelRecord,
    NotFoundError,
    PolicyRecord,
    ReleaseMaterial,
    SessionRecord,
    SpentNonce,
    WrapFunction,
    WrappedDek,
    check_model_id,
    utc,
)
from sealtorch.keyserver.store import _rows
from sealtorch.keyserver.store import _schema as t
from sealtorch.keyserver.store import _statements as q
from sealtorch.keyserver.store._engine import first_line
from sealtorch.keyserver.store._raw import RawStatements
from sealtorch.protocol.admin import AdminScope
from sealtorch.protocol.audit import AuditEntry, AuditRecord

__all__ = ["GroupTransaction", "SqlTransaction", "Transaction"]


class Transaction(ABC):
    """What both transactions share: connection, clock and ``create_session`` (a session row is
    inserted at once by a :class:`SqlTransaction`, buffered by a :class:`GroupTransaction`)."""

    def __init__(self, conn: sa.Connection, clock: Callable[[], datetime]) -> None:
        self._conn = conn
        self._clock = clock

    def _now(self) -> datetime:
        return utc(self._clock())

    @abstractmethod
    def _change(self) -> None:
        """Called before each change (a :class:`SqlTransaction` refuses one after its audit
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
        _rows.check_token_fields(token_id, digest)
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
        self._store_session(_rows.SESSION.row(record, digest=bytes(digest)))
        return record


class SqlTransaction(Transaction):
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
        return _rows.MODEL.record(row)

    def _insert_key(self, model_id: str, version: int, wrapped: WrappedDek) -> KeyVersionRecord:
        if not wrapped.blob:
            raise TypeError("wrap() must return a WrappedDek with the wrapped key")
        record = KeyVersionRecord(
            model_id=model_id,
            version=version,
            state=KeyState.ACTIVE,
            wrap_key_id=wrapped.wrap_key_id,
            fingerprint=wrapped.fingerprint,
            created_at=self._now(),
        )
        try:
            self._conn.execute(
                sa.insert(t.key_versions).values(
                    **_rows.KEY_VERSION.row(record, wrapped_dek=wrapped.blob)
                )
            )
        except sa_exc.IntegrityError as exc:
            raise ConflictError(
                f"key version {version} of model {model_id!r} was created concurrently; retry"
            ) from exc
        return record

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
            sa.select(*q.KEY_COLUMNS).where(q.version_is(model_id, version)).with_for_update()
        ).first()
        if row is None:
            raise NotFoundError(f"model {model_id!r} has no key version {version}")
        return _rows.KEY_VERSION.record(row)

    def _update_version(self, record: KeyVersionRecord, **values: Any) -> None:
        self._conn.execute(
            sa.update(t.key_versions)
            .where(q.version_is(record.model_id, record.version))
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
        self._conn.execute(sa.insert(t.policies).values(**_rows.POLICY.row(record)))
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
        _rows.check_token_fields(token_id, digest)
        if not 0 < len(name) <= 200:
            raise ConfigError("a token name is 1 to 200 characters")
        scopes_text = _rows.scopes_text(scopes)
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
                    **_rows.ADMIN_TOKEN.row(record, digest=bytes(digest))
                )
            )
        except sa_exc.IntegrityError as exc:
            raise ConflictError(f"admin token {token_id} already exists") from exc
        return record

    def _revoke_token(
        self, table: sa.Table, columns: Sequence[Any], token_id: str, *, what: str
    ) -> tuple[_rows.Row, datetime]:
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
        row, now = self._revoke_token(t.admin_tokens, q.ADMIN_COLUMNS, token_id, what="admin token")
        return replace(_rows.ADMIN_TOKEN.record(row), revoked_at=now)

    def _store_session(self, row: dict[str, Any]) -> None:
        try:
            self._conn.execute(q.INSERT_SESSION, row)
        except sa_exc.IntegrityError as exc:
            raise ConflictError(f"session {row['token_id']} already exists") from exc

    def revoke_session(self, token_id: str) -> SessionRecord:
        row, now = self._revoke_token(t.sessions, q.SESSION_COLUMNS, token_id, what="session")
        return replace(_rows.SESSION.record(row), revoked_at=now)

    def still_active(self, keys: Sequence[tuple[str, int]]) -> frozenset[tuple[str, int]]:
        if self.audited:
            raise AuditError("internal error: still_active() must come before the audit record")
        wanted = set(keys)
        if not wanted:
            return frozenset()
        model_ids = sorted({model_id for model_id, _ in wanted})
        rows = self._conn.execute(q.STILL_ACTIVE, {"ids": model_ids})
        return frozenset((row.model_id, row.version) for row in rows) & wanted

    # -- audit --

    def append_audit(self, entry: AuditEntry) -> AuditRecord:
        try:
            [record] = q.write_audit(self._conn, [(entry, None)], at=self._now())
        except sa_exc.SQLAlchemyError as exc:
            raise AuditError(
                f"the audit record could not be written ({first_line(exc)}); nothing was committed"
            ) from exc
        self.audited = True
        return record


class GroupTransaction(Transaction):
    """The transaction shared by one group of submitted work (see ``Store.submit``).

    Reads and the spending of nonces run at once; sessions and audit records are buffered and
    written by :meth:`flush` just before the commit, the audit records last and under the chain
    lock (one lock order for every writer). :meth:`mark` / :meth:`undo` drop what one unit of
    work buffered when it fails. The statements of every group (nonces, release material,
    audit) run on the DBAPI connection (:mod:`._raw`).
    """

    def __init__(
        self,
        conn: sa.Connection,
        clock: Callable[[], datetime],
        nonces: Sequence[SpentNonce] = (),
        *,
        raw: RawStatements,
    ) -> None:
        super().__init__(conn, clock)
        self._raw = raw
        # The nonces the group's work declared: spent up front, in one statement.
        declared = {bytes(n.value): n for n in nonces}
        self._declared = frozenset(declared)
        self._fresh: set[bytes] = set()
        if declared:
            self._fresh = raw.spend_nonces(conn, list(declared.values()))
        self._sessions: list[dict[str, Any]] = []
        self._entries: list[tuple[AuditEntry, dict[str, str | None]]] = []
        self._material: dict[tuple[str, ...] | None, list[ReleaseMaterial]] = {}
        self.records: list[AuditRecord] = []

    def _change(self) -> None:
        """Nothing to check: :meth:`flush` writes the audit records after everything else."""

    def spend_nonce(self, nonce: SpentNonce) -> bool:
        value = bytes(nonce.value)
        if value in self._declared:
            if value not in self._fresh:
                return False  # spent before, or a second use in this group
            self._fresh.discard(value)
            return True
        return bool(self._raw.spend_nonces(self._conn, [nonce]))

    def release_material(self, model_ids: Sequence[str] | None) -> list[ReleaseMaterial]:
        # Nothing in a group changes models, keys or policies: one read per distinct request.
        key = None if model_ids is None else tuple(model_ids)
        material = self._material.get(key)
        if material is None:
            material = self._raw.release_material(self._conn, model_ids)
            self._material[key] = material
        return material

    def _store_session(self, row: dict[str, Any]) -> None:
        self._sessions.append(row)

    def append_audit(self, entry: AuditEntry) -> None:
        # Encode now: a malformed entry fails its own unit of work, not the group.
        self._entries.append((entry, entry.encoded()))

    def mark(self) -> tuple[int, int]:
        return len(self._sessions), len(self._entries)

    def undo(self, mark: tuple[int, int]) -> None:
        del self._sessions[mark[0] :]
        del self._entries[mark[1] :]

    def flush(self) -> None:
        """Write what was buffered; the audit records last, under the chain lock."""
        if self._sessions:
            self._conn.execute(q.INSERT_SESSION, self._sessions)
        if not self._entries:
            return
        try:
            self.records = self._raw.write_audit(self._conn, self._entries, at=self._now())
        except sa_exc.SQLAlchemyError as exc:
            raise AuditError(
                f"the audit records could not be written ({first_line(exc)}); nothing was committed"
            ) from exc
