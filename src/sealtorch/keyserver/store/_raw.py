"""The group commit's hot statements on the DBAPI connection (SQLite's ``sqlite3``, psycopg 3).

Each group of the release path runs the same few statements: spend the group's nonces, read
the release material (models, current policies, active keys: share-locked on PostgreSQL),
append the audit records under the chain head's lock. Through
SQLAlchemy Core each costs several times what the database does for it (measured on the
2-core VM: ~290 µs per execution against ~57 µs for the bare driver), so they run here on the
transaction's own DBAPI connection, with the same SQL as :mod:`._statements` (a test compares
their results), the same conversions (times as microseconds since the epoch) and errors raised
as SQLAlchemy's (:class:`sqlalchemy.exc.DBAPIError`), so the committer treats a failure exactly
as before: the transaction is broken, nothing of the group is committed. Everything else (and
every admin write) stays on SQLAlchemy.
"""

# The SQL below is assembled from fixed names and placeholders only; every value is bound.
# ruff: noqa: S608

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from sealtorch.keyserver.records import (
    KeyState,
    ModelRecord,
    PolicyRecord,
    ReleaseMaterial,
    SpentNonce,
    WrappedKey,
)
from sealtorch.keyserver.store import _rows
from sealtorch.keyserver.store._schema import from_micros, to_micros
from sealtorch.keyserver.store._statements import assemble_release_material
from sealtorch.protocol.audit import AuditEntry, AuditRecord, build_record

__all__ = ["RawStatements"]

_AUDIT_COLUMNS = (
    "seq", "at", "kind", "action", "decision", "actor", "client_address", "request_id",
    "evidence_digest", "claims", "model_ids", "reasons", "details", "prev_hash", "hash",
)  # fmt: skip
_PLACEHOLDER = re.compile(r":(\w+)")


def _names(prefix: str, count: int) -> str:
    return ", ".join(f":{prefix}{index}" for index in range(count))


class RawStatements:
    """The hot statements for one backend (``sqlite`` or ``postgresql``)."""

    def __init__(self, backend: str) -> None:
        self._postgres = backend == "postgresql"
        self._cache: dict[tuple[str, int], str] = {}

    def _sql(self, name: str, count: int) -> str:
        """Statement ``name`` for ``count`` values of its list parameter, in the driver's
        parameter style (``:name`` for sqlite3, ``%(name)s`` for psycopg)."""
        key = (name, count)
        sql = self._cache.get(key)
        if sql is None:
            sql = self._build(name, count)
            if self._postgres:
                sql = _PLACEHOLDER.sub(r"%(\1)s", sql)
            self._cache[key] = sql
        return sql

    def _build(self, name: str, count: int) -> str:
        lock = " FOR UPDATE" if self._postgres else ""
        share = " FOR SHARE OF key_versions" if self._postgres else ""
        ids = _names("i", count)
        if name == "spend":
            # A nonce already spent (here or by another replica) is not inserted, so not
            # returned. Values in nonce order (PostgreSQL): no deadlock between replicas.
            values = ", ".join(f"(:n{index}, :e{index})" for index in range(count))
            return (
                f"INSERT INTO spent_nonces (nonce, expires_at) VALUES {values} "
                "ON CONFLICT (nonce) DO NOTHING RETURNING nonce"
            )
        where_ids = f" AND model_id IN ({ids})" if count else ""
        if name == "models":
            return (
                "SELECT model_id, created_at, deleted_at FROM models "
                f"WHERE deleted_at IS NULL{where_ids}"
            )
        if name == "policies":
            inner = f" WHERE model_id IN ({ids})" if count else ""
            return (
                "SELECT p.model_id, p.version, p.document, p.digest, p.created_at FROM policies p "
                "JOIN (SELECT model_id, max(version) AS version FROM policies"
                f"{inner} GROUP BY model_id) latest "
                "ON p.model_id = latest.model_id AND p.version = latest.version"
            )
        if name == "keys":
            key_ids = f" AND key_versions.model_id IN ({ids})" if count else ""
            return (
                "SELECT key_versions.model_id, key_versions.version, key_versions.state, "
                "key_versions.wrap_key_id, key_versions.fingerprint, key_versions.wrapped_dek "
                "FROM key_versions JOIN models ON models.model_id = key_versions.model_id "
                "WHERE key_versions.state = 'active' AND models.deleted_at IS NULL"
                f"{key_ids} ORDER BY key_versions.model_id, key_versions.version{share}"
            )
        if name == "head":
            return f"SELECT seq, hash FROM audit_head WHERE id = 1{lock}"
        if name == "insert_audit":
            return (
                f"INSERT INTO audit_log ({', '.join(_AUDIT_COLUMNS)}) "
                f"VALUES ({', '.join(':' + c for c in _AUDIT_COLUMNS)})"
            )
        if name == "update_head":
            return "UPDATE audit_head SET seq = :seq, hash = :hash WHERE id = 1"
        raise KeyError(name)  # pragma: no cover - our own names

    # -- running ----------------------------------------------------------------------------------

    @staticmethod
    def _run(
        conn: sa.Connection, sql: str, params: Any = None, *, many: bool = False
    ) -> list[tuple[Any, ...]]:
        """Execute on the transaction's DBAPI connection; driver errors become SQLAlchemy's."""
        dbapi = conn.connection.dbapi_connection
        driver_error = conn.dialect.loaded_dbapi.Error
        try:
            cursor = dbapi.cursor()  # type: ignore[union-attr]
            try:
                if many:
                    cursor.executemany(sql, params)
                    return []
                cursor.execute(sql, params if params is not None else {})
                return list(cursor.fetchall()) if cursor.description is not None else []
            finally:
                cursor.close()
        except driver_error as exc:
            gone = conn.dialect.is_disconnect(exc, dbapi, None)
            if gone:
                conn.invalidate()  # never back to the pool
            raise sa_exc.DBAPIError.instance(
                sql,
                None,
                exc,
                driver_error,
                hide_parameters=True,
                connection_invalidated=gone,
                dialect=conn.dialect,
            ) from exc

    def spend_nonces(self, conn: sa.Connection, nonces: Sequence[SpentNonce]) -> set[bytes]:
        """Record ``nonces`` (distinct values) as spent; the ones that were not spent before."""
        ordered = sorted(nonces, key=lambda nonce: nonce.value)
        params: dict[str, Any] = {}
        for index, nonce in enumerate(ordered):
            params[f"n{index}"] = nonce.value
            params[f"e{index}"] = to_micros(nonce.expires_at)
        rows = self._run(conn, self._sql("spend", len(ordered)), params)
        return {bytes(value) for (value,) in rows}

    def release_material(
        self, conn: sa.Connection, model_ids: Sequence[str] | None
    ) -> list[ReleaseMaterial]:
        """:func:`._statements.read_release_material` (locked) on the DBAPI connection."""
        wanted = None if model_ids is None else list(dict.fromkeys(model_ids))
        if wanted is not None and not wanted:
            return []
        count = 0 if wanted is None else len(wanted)
        params = {} if wanted is None else {f"i{index}": m for index, m in enumerate(wanted)}
        models = {
            model_id: ModelRecord(
                model_id=model_id,
                created_at=from_micros(int(created)),
                deleted_at=None if deleted is None else from_micros(int(deleted)),
            )
            for model_id, created, deleted in self._run(conn, self._sql("models", count), params)
        }
        policies = {
            model_id: PolicyRecord(
                model_id=model_id,
                version=int(version),
                document=document,
                digest=digest,
                created_at=from_micros(int(created)),
            )
            for model_id, version, document, digest, created in self._run(
                conn, self._sql("policies", count), params
            )
        }
        keys: dict[str, list[WrappedKey]] = {}
        for model_id, version, state, wrap_key_id, fingerprint, blob in self._run(
            conn, self._sql("keys", count), params
        ):
            keys.setdefault(model_id, []).append(
                WrappedKey(
                    model_id=model_id,
                    version=int(version),
                    state=KeyState(state),
                    wrap_key_id=wrap_key_id,
                    fingerprint=fingerprint,
                    blob=bytes(blob),
                )
            )
        return assemble_release_material(wanted, models, policies, keys)

    def write_audit(
        self,
        conn: sa.Connection,
        entries: Sequence[tuple[AuditEntry, Mapping[str, str | None] | None]],
        *,
        at: datetime,
    ) -> list[AuditRecord]:
        """:func:`._statements.write_audit` on the DBAPI connection."""
        [(head_seq, head_hash)] = self._run(conn, self._sql("head", 0))
        seq, prev_hash = int(head_seq), str(head_hash)
        records: list[AuditRecord] = []
        for entry, encoded in entries:
            record = build_record(entry, seq=seq + 1, at=at, prev_hash=prev_hash, encoded=encoded)
            records.append(record)
            seq, prev_hash = record.seq, record.hash
        rows = [_rows.AUDIT.row(record) for record in records]
        self._run(conn, self._sql("insert_audit", 0), rows, many=True)
        self._run(conn, self._sql("update_head", 0), {"seq": seq, "hash": prev_hash})
        return records
