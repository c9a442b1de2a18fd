"""The current database schema (SQLAlchemy Core tables). Private to the store.

Times are stored as BIGINT microseconds since the Unix epoch (UTC): exact, portable between
SQLite and PostgreSQL, and comparable in SQL. Migrations (``_migrations.py``) create and evolve
the real database; a test checks that a migrated database matches these definitions.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.types import TypeDecorator

__all__ = [
    "KEY_STATES",
    "UtcMicros",
    "admin_tokens",
    "audit_head",
    "audit_log",
    "key_versions",
    "metadata",
    "models",
    "policies",
    "schema_migrations",
    "sessions",
    "spent_nonces",
    "store_identity",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
KEY_STATES = ("active", "revoked", "destroyed")


def to_micros(value: datetime) -> int:
    if value.tzinfo is None:
        raise ValueError("times must be timezone-aware (UTC)")
    delta = value.astimezone(UTC) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


class UtcMicros(TypeDecorator[datetime]):
    """An aware UTC datetime stored as BIGINT microseconds since the epoch."""

    impl = sa.BigInteger
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> int | None:
        return None if value is None else to_micros(value)

    def process_result_value(self, value: int | None, dialect: Any) -> datetime | None:
        return None if value is None else from_micros(int(value))


def _model_version_key() -> tuple[sa.Column[Any], sa.Column[Any]]:
    """The primary key of a versioned row of a model: ``(model_id, version)``. Models are never
    deleted (only marked), so the foreign key restricts."""
    return (
        sa.Column(
            "model_id",
            sa.String(128),
            sa.ForeignKey("models.model_id", ondelete="RESTRICT"),
            primary_key=True,
        ),
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    )


metadata = sa.MetaData()

schema_migrations = sa.Table(
    "schema_migrations",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("applied_at", UtcMicros, nullable=False),
)

models = sa.Table(
    "models",
    metadata,
    sa.Column("model_id", sa.String(128), primary_key=True),
    sa.Column("created_at", UtcMicros, nullable=False),
    sa.Column("deleted_at", UtcMicros, nullable=True),
)

key_versions = sa.Table(
    "key_versions",
    metadata,
    *_model_version_key(),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("wrapped_dek", sa.LargeBinary, nullable=True),
    sa.Column("wrap_key_id", sa.String(200), nullable=False),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("created_at", UtcMicros, nullable=False),
    sa.Column("revoked_at", UtcMicros, nullable=True),
    sa.CheckConstraint("state IN ('active', 'revoked', 'destroyed')", name="ck_key_state"),
    sa.CheckConstraint(
        "(state = 'destroyed' AND wrapped_dek IS NULL) "
        "OR (state <> 'destroyed' AND wrapped_dek IS NOT NULL)",
        name="ck_key_material",
    ),
    sa.CheckConstraint("version >= 1", name="ck_key_version"),
)

policies = sa.Table(
    "policies",
    metadata,
    *_model_version_key(),
    sa.Column("document", sa.Text, nullable=False),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("created_at", UtcMicros, nullable=False),
    sa.CheckConstraint("version >= 1", name="ck_policy_version"),
)

#: Challenge nonces already spent by a release (migration 4), until they expire.
spent_nonces = sa.Table(
    "spent_nonces",
    metadata,
    sa.Column("nonce", sa.LargeBinary, primary_key=True),
    sa.Column("expires_at", UtcMicros, nullable=False),
    sa.Index("ix_spent_nonces_expires_at", "expires_at"),
)

admin_tokens = sa.Table(
    "admin_tokens",
    metadata,
    sa.Column("token_id", sa.String(32), primary_key=True),
    sa.Column("digest", sa.LargeBinary, nullable=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("created_at", UtcMicros, nullable=False),
    sa.Column("expires_at", UtcMicros, nullable=True),
    sa.Column("revoked_at", UtcMicros, nullable=True),
    # Space-separated scope names, sorted (migration 2). Every insert names them; the SQLite
    # column keeps its migration default '' (no scopes: a row written without them can do
    # nothing).
    sa.Column("scopes", sa.String(200), nullable=False),
)

sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("token_id", sa.String(32), primary_key=True),
    sa.Column("digest", sa.LargeBinary, nullable=False),
    sa.Column("hpke_suite", sa.String(100), nullable=False),
    sa.Column("public_key", sa.LargeBinary, nullable=False),
    sa.Column("claims", sa.Text, nullable=False),
    sa.Column("claims_digest", sa.String(64), nullable=False),
    sa.Column("evidence_digest", sa.String(128), nullable=True),
    sa.Column("model_ids", sa.Text, nullable=True),
    sa.Column("created_at", UtcMicros, nullable=False),
    sa.Column("expires_at", UtcMicros, nullable=False),
    sa.Column("revoked_at", UtcMicros, nullable=True),
    sa.Index("ix_sessions_expires_at", "expires_at"),
)

audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("at", sa.BigInteger, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("decision", sa.String(64), nullable=False),
    sa.Column("actor", sa.String(512), nullable=True),
    sa.Column("client_address", sa.String(512), nullable=True),
    sa.Column("request_id", sa.String(512), nullable=True),
    sa.Column("evidence_digest", sa.String(128), nullable=True),
    sa.Column("claims", sa.Text, nullable=True),
    sa.Column("model_ids", sa.Text, nullable=False),
    sa.Column("reasons", sa.Text, nullable=False),
    sa.Column("details", sa.Text, nullable=True),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)

#: One row (id = 1): the newest audit record's sequence number and hash. Appenders lock it.
audit_head = sa.Table(
    "audit_head",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.CheckConstraint("id = 1", name="ck_audit_head_single_row"),
)

store_identity = sa.Table(
    "store_identity",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("instance_id", sa.String(64), nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("probed_at", sa.BigInteger, nullable=False),
    # The challenge-nonce key wrapped by the master key (migration 4; written at first start).
    sa.Column("nonce_key", sa.LargeBinary, nullable=True),
    sa.CheckConstraint("id = 1", name="ck_store_identity_single_row"),
)
