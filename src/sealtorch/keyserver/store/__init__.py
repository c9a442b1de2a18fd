"""The key store interface. The service layer uses only this; it never imports SQLAlchemy.

:func:`open_store` returns a :class:`Store` backed by SQLAlchemy — an SQLite file (the embedded
default, ``sqlite:///PATH``) or PostgreSQL (``postgresql+psycopg://...``, for several key server
replicas on one database). Reads are methods of the store; every change goes through a
:class:`StoreTransaction`::

    with store.transaction() as tx:
        model, key = tx.create_model("resnet50", wrap=wrap_new_key)
        tx.append_audit(AuditEntry(kind=AuditKind.ADMIN, action="model.create", ...))

The key release hot path uses *group commit* instead: :meth:`Store.submit` hands a unit of work
(``work(tx) -> result`` on a :class:`GroupTransaction`) to a committer thread that runs every
unit waiting at that moment in one transaction with one disk flush, and resolves each unit's
future only after the commit. Under load many releases share a commit; each still learns its
outcome only once its audit record is durable (fail closed per request).

A transaction commits only if it changed nothing or appended an audit record *after* its last
change — otherwise it rolls back with :class:`~sealtorch.errors.AuditError` — so state changes
and their audit records are atomic, and the audit record is always the transaction's last write
(it takes the chain lock last, so there is one lock order and no deadlocks). If the commit
fails, nothing happened: callers release keys only after ``transaction()`` exits normally.

Errors: :class:`~sealtorch.keyserver.records.NotFoundError`,
:class:`~sealtorch.keyserver.records.ConflictError`, :class:`~sealtorch.errors.StorageError`
(database unavailable, locked, schema too old/new) and :class:`~sealtorch.errors.AuditError`
(the audit record could not be written).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from sealtorch.keyserver.records import (
    AdminTokenRecord,
    KeyVersionRecord,
    ModelRecord,
    PolicyRecord,
    ReleaseMaterial,
    SessionRecord,
    SpentNonce,
    WrapFunction,
    WrappedKey,
)
from sealtorch.protocol.admin import AdminScope
from sealtorch.protocol.audit import AuditEntry, AuditHead, AuditRecord

if TYPE_CHECKING:
    import sqlalchemy as sa

__all__ = [
    "Clock",
    "GroupTransaction",
    "Store",
    "StoreTransaction",
    "open_store",
    "sqlite_url",
]

#: Returns the current time as an aware UTC datetime (injectable for tests).
Clock = Callable[[], datetime]

_T = TypeVar("_T")


class _SessionWriter(Protocol):
    """What both kinds of transaction offer for sessions."""

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
        """A renewal session, bound to the HPKE key and claims of the release that opens it.

        ConfigError (nothing written) for a malformed token id, digest or claims.
        """
        ...


class StoreTransaction(_SessionWriter, Protocol):
    """One atomic unit of change. Obtain it from :meth:`Store.transaction`."""

    def create_model(
        self, model_id: str, *, wrap: WrapFunction
    ) -> tuple[ModelRecord, KeyVersionRecord]:
        """Create a model with key version 1 (``wrap(1)`` supplies the wrapped key).

        :class:`ConflictError` if the id exists or existed (deleted ids are never reused).
        """
        ...

    def add_key_version(self, model_id: str, *, wrap: WrapFunction) -> KeyVersionRecord:
        """Rotate: allocate the next version under a lock and store ``wrap(version)``."""
        ...

    def revoke_key_version(self, model_id: str, version: int) -> KeyVersionRecord:
        """Mark a version revoked (never released again). ConflictError if not active."""
        ...

    def replace_wrapped_key(
        self, model_id: str, version: int, *, blob: bytes, wrap_key_id: str
    ) -> KeyVersionRecord:
        """Store the same data key re-wrapped by another master key (master key rotation)."""
        ...

    def delete_model(self, model_id: str) -> ModelRecord:
        """Delete a model: mark it deleted and erase every wrapped key (crypto-shredding)."""
        ...

    def set_policy(self, model_id: str, document: str) -> PolicyRecord:
        """Store a new policy version (JSON text; validated by the caller)."""
        ...

    def create_admin_token(
        self,
        *,
        token_id: str,
        digest: bytes,
        name: str,
        scopes: Iterable[AdminScope],
        expires_at: datetime | None = None,
    ) -> AdminTokenRecord:
        """A new admin token with ``scopes`` (at least one: ConfigError otherwise)."""
        ...

    def revoke_admin_token(self, token_id: str) -> AdminTokenRecord: ...

    def revoke_session(self, token_id: str) -> SessionRecord: ...

    def still_active(self, keys: Sequence[tuple[str, int]]) -> frozenset[tuple[str, int]]:
        """Which ``(model_id, version)`` pairs are still active, read under a share lock.

        The release path calls this inside the transaction that writes its audit record, so a
        revocation that committed after :meth:`Store.release_material` is honoured: keys that
        are not returned must not be released.
        """
        ...

    def append_audit(self, entry: AuditEntry) -> AuditRecord:
        """Append to the audit chain (serialised across processes); must be the last write."""
        ...


class GroupTransaction(_SessionWriter, Protocol):
    """The transaction a unit of work submitted with :meth:`Store.submit` runs on, shared with
    the other units of its group. Models, keys and policies never change within a group.

    ``spend_nonce`` and the reads run at once; sessions and audit records are written when
    the group commits (the audit records last, in submission order, as one piece of the chain).
    If a unit of work raises, what it buffered is dropped and its caller gets the exception; a
    nonce it spent stays spent (as if spent in its own transaction).
    """

    def spend_nonce(self, nonce: SpentNonce) -> bool:
        """Record the nonce as spent: ``True`` for exactly one caller in any process (until
        the purge removes it after its expiry); ``False`` if it was spent before."""
        ...

    def release_material(self, model_ids: Sequence[str] | None) -> list[ReleaseMaterial]:
        """:meth:`Store.release_material` inside the transaction: key versions read here are
        share-locked until the commit, so a revocation committed before it is honoured and one
        committed after it is ordered after this release."""
        ...

    def append_audit(self, entry: AuditEntry) -> None:
        """Append to the audit chain when the group commits (each unit's records, in order)."""
        ...


class Store(Protocol):
    """Persistent state of the key server (see the module docstring)."""

    @property
    def backend(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        ...

    @property
    def engine(self) -> sa.Engine:
        """The SQLAlchemy engine, with the store's connection settings (SQLite pragmas, pool).

        For maintenance SQL (inspection, ``PRAGMA``, operator scripts) and tests. Changes made
        through it bypass the store's write lock and its audit records; the audit table still
        refuses ``UPDATE`` and ``DELETE``. The service layer never uses it.
        """
        ...

    # -- lifecycle --

    def migrate(self) -> int:
        """Bring the schema up to date (safe to run concurrently); returns the version."""
        ...

    def schema_version(self) -> int: ...

    def check_schema(self) -> None:
        """StorageError unless the schema is exactly the version this code expects."""
        ...

    def ping(self) -> None:
        """StorageError unless the database answers (health checks)."""
        ...

    def instance_id(self) -> str:
        """The store's random instance id (made by migration 3); the data directory of every
        key server on this store holds the same id (``DIR/instance-id``)."""
        ...

    def integrity_check(self) -> None:
        """:class:`~sealtorch.errors.StorageCorruptError` if SQLite's ``quick_check`` finds
        damage (PostgreSQL: ``ping``); ``keyserver serve`` runs it at start."""
        ...

    def probe(self) -> None:
        """Raise unless the store can *commit* (readiness): a durable one-row write, at most
        once a second. :class:`~sealtorch.errors.StorageCorruptError` once the database said
        it is damaged, :class:`~sealtorch.errors.StorageFullError` on a full disk, else
        :class:`~sealtorch.errors.StorageError`. Recovers by itself when the cause goes."""
        ...

    def close(self) -> None: ...

    def transaction(self) -> AbstractContextManager[StoreTransaction]: ...

    def submit(
        self,
        work: Callable[[GroupTransaction], _T],
        *,
        nonce: SpentNonce | None = None,
    ) -> Future[_T]:
        """Run ``work(tx)`` in the next group commit; the future resolves after the commit.

        ``nonce``: the nonce ``work`` will spend (``tx.spend_nonce``); the group spends every
        declared nonce in one statement. The
        future's exception is :class:`StorageError` /
        :class:`AuditError` when the group could not be committed (nothing of it was), or what
        ``work`` raised.
        """
        ...

    # -- models and keys --

    def get_model(self, model_id: str, *, include_deleted: bool = False) -> ModelRecord | None: ...

    def list_models(self, *, include_deleted: bool = False) -> list[ModelRecord]: ...

    def list_key_versions(self, model_id: str) -> list[KeyVersionRecord]: ...

    def get_key_version(self, model_id: str, version: int) -> KeyVersionRecord | None: ...

    def current_key_version(self, model_id: str) -> KeyVersionRecord | None:
        """The newest *active* version (what new files are sealed under), if any."""
        ...

    def get_wrapped_key(self, model_id: str, version: int) -> WrappedKey | None:
        """A version with its wrapped key (any state but destroyed). Secret: handle with care."""
        ...

    def active_wrapped_keys(self, model_id: str) -> list[WrappedKey]:
        """Every active version of a live model with its wrapped key (the release path)."""
        ...

    def release_material(self, model_ids: Sequence[str] | None) -> list[ReleaseMaterial]:
        """Model, current policy and active wrapped keys of each model, in one snapshot.

        ``None`` means every live model. Order follows ``model_ids`` (or model id order).
        """
        ...

    # -- policies --

    def current_policy(self, model_id: str) -> PolicyRecord | None: ...

    def current_policies(self) -> list[PolicyRecord]:
        """The current policy of every live model that has one (model id order)."""
        ...

    def get_policy(self, model_id: str, version: int) -> PolicyRecord | None: ...

    def list_policies(self, model_id: str) -> list[PolicyRecord]: ...

    # -- challenge nonces --

    def spend_nonce(self, nonce: SpentNonce) -> bool:
        """:meth:`GroupTransaction.spend_nonce` in a transaction of its own."""
        ...

    def nonce_key(self, make: Callable[[], bytes]) -> bytes:
        """The store's wrapped challenge-nonce key (:mod:`sealtorch.keyserver.nonces`); the
        first caller stores ``make()`` (replicas starting together: the first write wins)."""
        ...

    def purge_expired(self, *, now: datetime) -> int:
        """Delete spent nonces that expired and expired sessions; returns how many rows went."""
        ...

    # -- tokens and sessions --

    def get_admin_token(self, token_id: str) -> AdminTokenRecord | None: ...

    def admin_token_digest(self, token_id: str) -> bytes | None: ...

    def list_admin_tokens(self) -> list[AdminTokenRecord]: ...

    def get_session(self, token_id: str) -> SessionRecord | None: ...

    def session_digest(self, token_id: str) -> bytes | None: ...

    # -- audit --

    def append_audit(self, entry: AuditEntry) -> AuditRecord:
        """Append one record in its own transaction (decisions without a state change)."""
        ...

    def audit_head(self) -> AuditHead: ...

    def iter_audit(
        self, *, after_seq: int = 0, up_to_seq: int | None = None
    ) -> Iterator[AuditRecord]:
        """Records in sequence order, fetched in batches."""
        ...


def sqlite_url(path: str | os.PathLike[str]) -> str:
    """The store URL of an SQLite database file."""
    return "sqlite:///" + str(Path(path).absolute())


def open_store(url: str, *, clock: Clock | None = None, **options: Any) -> Store:
    """Open the store at ``url`` (``sqlite:///PATH`` or ``postgresql+psycopg://...``).

    Options: ``busy_timeout`` (seconds to wait for a lock, default 10), ``sqlite_synchronous``
    (``"FULL"`` default, or ``"NORMAL"``), ``pool_size`` (PostgreSQL, default 10), ``create``
    (default true; false refuses a missing or empty SQLite file: ``keyserver serve``). The schema
    is *not* migrated here: call :meth:`Store.migrate` (``keyserver init``/``serve`` do) or
    :meth:`Store.check_schema`.
    """
    from sealtorch.keyserver.store._sql import SqlStore  # SQLAlchemy only when needed

    return SqlStore(url, clock=clock, **options)
