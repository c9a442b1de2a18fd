"""The SQLAlchemy implementation of :class:`~sealtorch.keyserver.store.Store`: the facade.

It holds the engine (``_engine``), the write lock (SQLite: ``_sqlite_lock``; PostgreSQL: row
locks — ``SELECT ... FOR UPDATE`` serialises version allocation per model and audit appends on
the single ``audit_head`` row, so several key server processes on one database keep one
consistent chain) and the group committer (``_group_commit``); it runs the reads itself and
hands writes to the transactions (``_transactions``). Rows are converted to the records of
``sealtorch.keyserver.records`` (``_rows``) before they leave.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from typing import Any, NoReturn, TypeVar

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from sealtorch.errors import AuditError, StorageCorruptError, StorageError, StorageFullError
from sealtorch.keyserver.records import (
    AdminTokenRecord,
    KeyState,
    KeyVersionRecord,
    ModelRecord,
    PolicyRecord,
    ReleaseMaterial,
    SessionRecord,
    SpentNonce,
    WrappedKey,
    utc,
)
from sealtorch.keyserver.store import _rows
from sealtorch.keyserver.store import _schema as t
from sealtorch.keyserver.store import _statements as q
from sealtorch.keyserver.store._engine import WRITE, failure_kind, first_line, open_database
from sealtorch.keyserver.store._group_commit import GroupCommitter
from sealtorch.keyserver.store._migrations import applied_version, latest_version, run_migrations
from sealtorch.keyserver.store._raw import RawStatements
from sealtorch.keyserver.store._sqlite_lock import SqliteWriteLock
from sealtorch.keyserver.store._transactions import SqlTransaction
from sealtorch.protocol.audit import AuditEntry, AuditHead, AuditRecord

__all__ = ["SqlStore"]

_log = logging.getLogger(__name__)

_T = TypeVar("_T")

_AUDIT_BATCH = 500
#: Seconds between two probe commits (readiness checks in between share the last outcome).
_PROBE_INTERVAL = 1.0


def _system_clock() -> datetime:
    return datetime.now(UTC)


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
        create: bool = True,
    ) -> None:
        self._clock = clock or _system_clock
        database = open_database(
            url,
            busy_timeout=busy_timeout,
            sqlite_synchronous=sqlite_synchronous,
            pool_size=pool_size,
            create=create,
        )
        self._engine = database.engine
        self._backend = database.backend
        self._raw = RawStatements(self._backend)
        self._description = database.description
        # SQLite has one writer at a time. Writers (threads, and processes sharing the file)
        # queue on a lock instead of in SQLite's busy handler, whose sleeps (up to 100 ms each)
        # make a long latency tail under concurrent requests.
        self._sqlite_lock = (
            SqliteWriteLock(database.sqlite_path, busy_timeout)
            if database.sqlite_path is not None
            else None
        )
        self._write_lock: AbstractContextManager[Any] = (
            self._sqlite_lock or contextlib.nullcontext()
        )
        # Set once a database error said "corrupt": only a restore (and a restart) clears it.
        self._corruption: str | None = None
        self._probe_lock = threading.Lock()
        self._probed: tuple[float, StorageError | None] | None = None
        self._committer = GroupCommitter(
            begin_write=self._begin_write,
            raw=self._raw,
            sqlite_lock=self._sqlite_lock,
            clock=self._clock,
            backend=self._backend,
            on_failure=self._note_failure,
        )

    # -- plumbing --

    @property
    def backend(self) -> str:
        return self._backend

    @property
    def engine(self) -> sa.Engine:
        return self._engine

    def __repr__(self) -> str:
        return f"SqlStore({self._description!r})"

    def _note_failure(self, exc: BaseException) -> None:
        """Remember a database error that said "corrupt" (the probe reports it from then on)."""
        for error in (exc, exc.__cause__):
            if error is not None and failure_kind(error) is StorageCorruptError:
                self._corruption = first_line(error)
                _log.error("the key store is corrupt: %s", self._corruption)

    def _fail(self, exc: sa_exc.SQLAlchemyError, what: str) -> NoReturn:
        kind = failure_kind(exc)
        if kind is StorageCorruptError:
            self._corruption = first_line(exc)
            raise StorageCorruptError(
                f"the key store ({self._backend}) is corrupt ({first_line(exc)}) while {what}; "
                "retrying does not help: restore it from a backup (docs/keyserver.md)"
            ) from exc
        if kind is StorageFullError:
            raise StorageFullError(
                f"the key store ({self._backend}) cannot write: the disk is full "
                f"({first_line(exc)}) while {what}; free space on its volume"
            ) from exc
        raise StorageError(
            f"the key store ({self._backend}) failed while {what} ({first_line(exc)}); check "
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
        self, what: str, convert: Callable[[_rows.Row], _T], query: Any, params: Any = None
    ) -> _T | None:
        """The first row of ``query`` as ``convert`` makes it, or ``None`` if there is none."""
        with self._read(what) as conn:
            row = conn.execute(query, params).first()
        return None if row is None else convert(row)

    def _all(
        self, what: str, convert: Callable[[_rows.Row], _T], query: Any, params: Any = None
    ) -> list[_T]:
        with self._read(what) as conn:
            return [convert(row) for row in conn.execute(query, params)]

    @contextmanager
    def _begin_write(self) -> Iterator[sa.Connection]:
        """A connection in a write transaction (the caller holds the write lock)."""
        with self._engine.connect().execution_options(**{WRITE: True}) as conn, conn.begin():
            yield conn

    @contextmanager
    def _write(self, what: str) -> Iterator[sa.Connection]:
        """A write transaction of its own."""
        try:
            with self._write_lock, self._begin_write() as conn:
                yield conn
        except sa_exc.SQLAlchemyError as exc:
            self._fail(exc, what)

    @contextmanager
    def transaction(self) -> Iterator[SqlTransaction]:
        tx: SqlTransaction | None = None
        try:
            with self._write_lock, self._begin_write() as conn:
                tx = SqlTransaction(conn, self._clock)
                yield tx
                if tx.changed and not tx.audited:
                    raise AuditError(
                        "internal error: a state change without an audit record; it was rolled "
                        "back (every change must be audited in the same transaction)"
                    )
        except sa_exc.SQLAlchemyError as exc:
            if tx is not None and tx.audited:
                raise AuditError(
                    f"the audit record could not be committed ({first_line(exc)}); nothing was "
                    "committed"
                ) from exc
            self._fail(exc, "writing")

    def submit(self, work: Callable[[Any], _T], *, nonce: SpentNonce | None = None) -> Future[_T]:
        return self._committer.submit(work, nonce=nonce)

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

    def instance_id(self) -> str:
        with self._read("reading the store's instance id") as conn:
            value = conn.execute(sa.select(t.store_identity.c.instance_id)).scalar()
        if not value:
            raise StorageError(
                "the key store has no instance id; run `sealtorch keyserver serve` once with "
                "this sealtorch to migrate it"
            )
        return str(value)

    def integrity_check(self) -> None:
        if self._backend != "sqlite":
            self.ping()  # PostgreSQL checks its own pages (and reports XX001 when it reads one)
            return
        with self._read("checking the database's integrity") as conn:
            rows = [str(r[0]) for r in conn.exec_driver_sql("PRAGMA quick_check").fetchall()]
        if rows != ["ok"]:
            self._corruption = rows[0][:200] if rows else "no answer"
            raise StorageCorruptError(
                f"the key store {self._description} is corrupt (SQLite quick_check: "
                f"{'; '.join(rows[:3])[:300]}); restore it from a backup (docs/keyserver.md, "
                '"Backups and restore")'
            )

    def probe(self) -> None:
        """Prove the store can commit: a durable write of ``store_identity.probed_at`` (at most
        one a second; callers in between get the last outcome). StorageCorruptError once a
        database error said "corrupt"; StorageFullError / StorageError as the write fails."""
        if self._corruption is not None:
            raise StorageCorruptError(
                f"the key store is corrupt ({self._corruption}); restore it from a backup "
                "(docs/keyserver.md)"
            )
        with self._probe_lock:
            now = time.monotonic()
            if self._probed is None or now - self._probed[0] >= _PROBE_INTERVAL:
                error: StorageError | None = None
                try:
                    with self._write("proving the store can commit") as conn:
                        conn.execute(
                            sa.update(t.store_identity)
                            .where(t.store_identity.c.id == 1)
                            .values(probed_at=t.to_micros(utc(self._clock())))
                        )
                except StorageError as exc:
                    error = exc
                self._probed = (time.monotonic(), error)
            error = self._probed[1]
        if error is not None:
            raise type(error)(str(error)) from error

    def close(self) -> None:
        self._committer.close()
        self._engine.dispose()

    # -- models and keys --

    def get_model(self, model_id: str, *, include_deleted: bool = False) -> ModelRecord | None:
        query = sa.select(t.models).where(t.models.c.model_id == model_id)
        if not include_deleted:
            query = query.where(t.models.c.deleted_at.is_(None))
        return self._one("reading a model", _rows.MODEL.record, query)

    def list_models(self, *, include_deleted: bool = False) -> list[ModelRecord]:
        query = sa.select(t.models).order_by(t.models.c.model_id)
        if not include_deleted:
            query = query.where(t.models.c.deleted_at.is_(None))
        return self._all("listing models", _rows.MODEL.record, query)

    def list_key_versions(self, model_id: str) -> list[KeyVersionRecord]:
        query = (
            sa.select(*q.KEY_COLUMNS)
            .where(t.key_versions.c.model_id == model_id)
            .order_by(t.key_versions.c.version)
        )
        return self._all("listing key versions", _rows.KEY_VERSION.record, query)

    def get_key_version(self, model_id: str, version: int) -> KeyVersionRecord | None:
        query = sa.select(*q.KEY_COLUMNS).where(q.version_is(model_id, version))
        return self._one("reading a key version", _rows.KEY_VERSION.record, query)

    def current_key_version(self, model_id: str) -> KeyVersionRecord | None:
        query = (
            q.active_keys(*q.KEY_COLUMNS)
            .where(t.key_versions.c.model_id == model_id)
            .order_by(t.key_versions.c.version.desc())
            .limit(1)
        )
        return self._one("reading the current key version", _rows.KEY_VERSION.record, query)

    def get_wrapped_key(self, model_id: str, version: int) -> WrappedKey | None:
        query = sa.select(*q.KEY_COLUMNS, t.key_versions.c.wrapped_dek).where(
            q.version_is(model_id, version), t.key_versions.c.state != KeyState.DESTROYED.value
        )
        return self._one("reading a wrapped key", _rows.WRAPPED_KEY.record, query)

    def active_wrapped_keys(self, model_id: str) -> list[WrappedKey]:
        return self._all(
            "reading wrapped keys",
            _rows.WRAPPED_KEY.record,
            q.ACTIVE_WRAPPED_KEYS,
            {"model": model_id},
        )

    def release_material(self, model_ids: Sequence[str] | None) -> list[ReleaseMaterial]:
        with self._read("reading release material") as conn:
            return q.read_release_material(conn, model_ids, locked=False)

    # -- policies --

    def current_policy(self, model_id: str) -> PolicyRecord | None:
        return self._one(
            "reading a policy", _rows.POLICY.record, q.CURRENT_POLICY, {"model": model_id}
        )

    def current_policies(self) -> list[PolicyRecord]:
        return self._all("reading the current policies", _rows.POLICY.record, q.CURRENT_POLICIES)

    def get_policy(self, model_id: str, version: int) -> PolicyRecord | None:
        query = sa.select(t.policies).where(
            t.policies.c.model_id == model_id, t.policies.c.version == version
        )
        return self._one("reading a policy", _rows.POLICY.record, query)

    def list_policies(self, model_id: str) -> list[PolicyRecord]:
        query = (
            sa.select(t.policies)
            .where(t.policies.c.model_id == model_id)
            .order_by(t.policies.c.version)
        )
        return self._all("listing policies", _rows.POLICY.record, query)

    # -- nonces --

    def spend_nonce(self, nonce: SpentNonce) -> bool:
        with self._write("spending a nonce") as conn:
            return bool(self._raw.spend_nonces(conn, [nonce]))

    def nonce_key(self, make: Callable[[], bytes]) -> bytes:
        identity = t.store_identity
        with self._read("reading the nonce key") as conn:
            blob = conn.execute(sa.select(identity.c.nonce_key)).scalar()
        if blob is not None:
            return bytes(blob)
        made = make()
        # Replicas starting together: the first write wins, every one reads it back.
        with self._write("storing the nonce key") as conn:
            conn.execute(
                sa.update(identity)
                .where(identity.c.id == 1, identity.c.nonce_key.is_(None))
                .values(nonce_key=made)
            )
            blob = conn.execute(sa.select(identity.c.nonce_key)).scalar()
        if blob is None:
            raise StorageError(
                "the key store has no identity row; run 'sealtorch keyserver init' to make one"
            )
        return bytes(blob)

    def purge_expired(self, *, now: datetime) -> int:
        moment = utc(now)
        with self._write("purging expired nonces and sessions") as conn:
            gone = conn.execute(
                sa.delete(t.spent_nonces).where(t.spent_nonces.c.expires_at <= moment)
            )
            ended = conn.execute(sa.delete(t.sessions).where(t.sessions.c.expires_at <= moment))
            return int(gone.rowcount or 0) + int(ended.rowcount or 0)

    # -- tokens and sessions --

    def get_admin_token(self, token_id: str) -> AdminTokenRecord | None:
        query = sa.select(*q.ADMIN_COLUMNS).where(t.admin_tokens.c.token_id == token_id)
        return self._one("reading an admin token", _rows.ADMIN_TOKEN.record, query)

    def admin_token_digest(self, token_id: str) -> bytes | None:
        query = sa.select(t.admin_tokens.c.digest).where(t.admin_tokens.c.token_id == token_id)
        return self._one("reading an admin token", _rows.digest, query)

    def list_admin_tokens(self) -> list[AdminTokenRecord]:
        query = sa.select(*q.ADMIN_COLUMNS).order_by(t.admin_tokens.c.created_at)
        return self._all("listing admin tokens", _rows.ADMIN_TOKEN.record, query)

    def get_session(self, token_id: str) -> SessionRecord | None:
        query = sa.select(*q.SESSION_COLUMNS).where(t.sessions.c.token_id == token_id)
        return self._one("reading a session", _rows.SESSION.record, query)

    def session_digest(self, token_id: str) -> bytes | None:
        query = sa.select(t.sessions.c.digest).where(t.sessions.c.token_id == token_id)
        return self._one("reading a session", _rows.digest, query)

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
            batch = self._all("reading the audit log", _rows.AUDIT.record, query)
            yield from batch
            if len(batch) < _AUDIT_BATCH:
                return
            last = batch[-1].seq
