"""The SQL statements of the store, built once (constructing SQLAlchemy statements costs more
than executing them on SQLite), and the two multi-statement reads/writes the transactions share:
:func:`read_release_material` and :func:`write_audit`. The group commit runs its own copies of
the hot ones on the database driver (:mod:`._raw`; a test checks they agree with these).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from sealtorch.keyserver.records import (
    KeyState,
    ModelRecord,
    PolicyRecord,
    ReleaseMaterial,
    WrappedKey,
)
from sealtorch.keyserver.store import _rows
from sealtorch.keyserver.store import _schema as t
from sealtorch.protocol.audit import AuditEntry, AuditRecord, build_record

__all__ = [
    "ACTIVE_WRAPPED_KEYS",
    "ADMIN_COLUMNS",
    "CURRENT_POLICIES",
    "CURRENT_POLICY",
    "INSERT_SESSION",
    "KEY_COLUMNS",
    "SESSION_COLUMNS",
    "STILL_ACTIVE",
    "active_keys",
    "read_release_material",
    "version_is",
    "write_audit",
]

KEY_COLUMNS = (
    t.key_versions.c.model_id,
    t.key_versions.c.version,
    t.key_versions.c.state,
    t.key_versions.c.wrap_key_id,
    t.key_versions.c.fingerprint,
    t.key_versions.c.created_at,
    t.key_versions.c.revoked_at,
)
ADMIN_COLUMNS = tuple(c for c in t.admin_tokens.c if c.name != "digest")
SESSION_COLUMNS = tuple(c for c in t.sessions.c if c.name != "digest")


def version_is(model_id: str, version: int) -> sa.ColumnElement[bool]:
    return sa.and_(t.key_versions.c.model_id == model_id, t.key_versions.c.version == version)


def active_keys(*columns: Any) -> sa.Select[Any]:
    """``columns`` of the active key versions of live (not deleted) models."""
    return (
        sa.select(*columns)
        .join(t.models, t.models.c.model_id == t.key_versions.c.model_id)
        .where(t.key_versions.c.state == KeyState.ACTIVE.value, t.models.c.deleted_at.is_(None))
    )


# Hot-path statements (release, audit) are built once: constructing SQLAlchemy statements
# costs more than executing them on SQLite.
ACTIVE_WRAPPED_KEYS = (
    active_keys(*KEY_COLUMNS, t.key_versions.c.wrapped_dek)
    .where(t.key_versions.c.model_id == sa.bindparam("model"))
    .order_by(t.key_versions.c.version)
)
CURRENT_POLICY = (
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
    keys_query = active_keys(*KEY_COLUMNS, t.key_versions.c.wrapped_dek).order_by(
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
CURRENT_POLICIES = (
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
STILL_ACTIVE = (
    active_keys(t.key_versions.c.model_id, t.key_versions.c.version)
    .where(t.key_versions.c.model_id.in_(sa.bindparam("ids", expanding=True)))
    .with_for_update(read=True, of=t.key_versions)
)

_LOCK_AUDIT_HEAD = (
    sa.select(t.audit_head.c.seq, t.audit_head.c.hash)
    .where(t.audit_head.c.id == 1)
    .with_for_update()
)
_INSERT_AUDIT = sa.insert(t.audit_log)
INSERT_SESSION = sa.insert(t.sessions)
_UPDATE_AUDIT_HEAD = (
    sa.update(t.audit_head)
    .where(t.audit_head.c.id == 1)
    .values(seq=sa.bindparam("new_seq"), hash=sa.bindparam("new_hash"))
)


def read_release_material(
    conn: sa.Connection, model_ids: Sequence[str] | None, *, locked: bool
) -> list[ReleaseMaterial]:
    """``Store.release_material`` on ``conn`` (``locked``: inside a write transaction)."""
    wanted = None if model_ids is None else list(dict.fromkeys(model_ids))
    if wanted is not None and not wanted:
        return []
    statements = _LOCKED_RELEASE if locked else {False: _RELEASE_ALL, True: _RELEASE_SOME}
    models_query, policies_query, keys_query = statements[wanted is not None]
    params: dict[str, Any] = {} if wanted is None else {"ids": wanted}
    models = {row.model_id: _rows.MODEL.record(row) for row in conn.execute(models_query, params)}
    policies = {
        row.model_id: _rows.POLICY.record(row) for row in conn.execute(policies_query, params)
    }
    keys: dict[str, list[WrappedKey]] = {}
    for row in conn.execute(keys_query, params):
        keys.setdefault(row.model_id, []).append(_rows.WRAPPED_KEY.record(row))
    return assemble_release_material(wanted, models, policies, keys)


def assemble_release_material(
    wanted: Sequence[str] | None,
    models: Mapping[str, ModelRecord],
    policies: Mapping[str, PolicyRecord],
    keys: Mapping[str, Sequence[WrappedKey]],
) -> list[ReleaseMaterial]:
    """The release material of ``wanted`` (in that order; None: every model, by id) from the
    rows read for it - shared by the SQLAlchemy and the driver paths (:mod:`._raw`)."""
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


def write_audit(
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
    conn.execute(_INSERT_AUDIT, [_rows.AUDIT.row(record) for record in records])
    conn.execute(_UPDATE_AUDIT_HEAD, {"new_seq": seq, "new_hash": prev_hash})
    return records
