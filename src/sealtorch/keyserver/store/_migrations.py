"""Schema migrations: an ordered list of steps and a ``schema_migrations`` table.

Why not Alembic: the key server needs exactly three things — apply pending steps in order on a
fresh or older database, never run against a database *newer* than the code, and stay correct
when several replicas start at the same time on one PostgreSQL. A dozen lines do that without
an ``env.py``/ini layer in a library and without a second dependency at run time:

* every pending step runs in **one transaction** with its ``schema_migrations`` row (both
  SQLite and PostgreSQL have transactional DDL), so a failed upgrade leaves the old schema;
* the transaction first takes a lock — ``pg_advisory_xact_lock`` on PostgreSQL, ``BEGIN
  IMMEDIATE`` on SQLite — so concurrent starters serialise and the second finds nothing to do;
* a database whose version is higher than the newest step is refused with a clear message.

Steps are frozen snapshots: a step never changes once released (a later change is a new step).
``tests/unit/keyserver`` checks that a fully migrated database matches ``_schema.metadata``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa

from sealtorch.errors import StorageError
from sealtorch.keyserver.store._schema import UtcMicros
from sealtorch.protocol.audit import GENESIS_HASH

__all__ = ["MIGRATIONS", "Migration", "applied_version", "latest_version", "run_migrations"]

# Arbitrary constant naming "the sealtorch schema migration lock" among advisory locks.
_ADVISORY_LOCK_KEY = 0x5EA170C4_0001


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    apply: Callable[[sa.Connection], None]


def _v1_initial(conn: sa.Connection) -> None:
    md = sa.MetaData()
    sa.Table(
        "models",
        md,
        sa.Column("model_id", sa.String(128), primary_key=True),
        sa.Column("created_at", UtcMicros, nullable=False),
        sa.Column("deleted_at", UtcMicros, nullable=True),
    )
    sa.Table(
        "key_versions",
        md,
        sa.Column(
            "model_id",
            sa.String(128),
            sa.ForeignKey("models.model_id", ondelete="RESTRICT"),
            primary_key=True,
        ),
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
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
    sa.Table(
        "policies",
        md,
        sa.Column(
            "model_id",
            sa.String(128),
            sa.ForeignKey("models.model_id", ondelete="RESTRICT"),
            primary_key=True,
        ),
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("document", sa.Text, nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("created_at", UtcMicros, nullable=False),
        sa.CheckConstraint("version >= 1", name="ck_policy_version"),
    )
    sa.Table(
        "nonces",
        md,
        sa.Column("nonce", sa.LargeBinary, primary_key=True),
        sa.Column("created_at", UtcMicros, nullable=False),
        sa.Column("expires_at", UtcMicros, nullable=False),
        sa.Index("ix_nonces_expires_at", "expires_at"),
    )
    sa.Table(
        "admin_tokens",
        md,
        sa.Column("token_id", sa.String(32), primary_key=True),
        sa.Column("digest", sa.LargeBinary, nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("created_at", UtcMicros, nullable=False),
        sa.Column("expires_at", UtcMicros, nullable=True),
        sa.Column("revoked_at", UtcMicros, nullable=True),
    )
    sa.Table(
        "sessions",
        md,
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
    sa.Table(
        "audit_log",
        md,
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
    head = sa.Table(
        "audit_head",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.CheckConstraint("id = 1", name="ck_audit_head_single_row"),
    )
    md.create_all(conn)
    conn.execute(sa.insert(head).values(id=1, seq=0, hash=GENESIS_HASH))
    # Defence in depth: the application never updates or deletes audit records. (Someone who
    # can drop triggers can still edit the table; verify_chain is what detects that.)
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(
            "CREATE FUNCTION sealtorch_audit_append_only() RETURNS trigger "
            "LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION 'audit_log is append-only'; END $$"
        )
        conn.exec_driver_sql(
            "CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log "
            "FOR EACH ROW EXECUTE FUNCTION sealtorch_audit_append_only()"
        )
        conn.exec_driver_sql(
            "CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log "
            "FOR EACH STATEMENT EXECUTE FUNCTION sealtorch_audit_append_only()"
        )
    else:
        for event in ("UPDATE", "DELETE"):
            conn.exec_driver_sql(
                f"CREATE TRIGGER audit_log_no_{event.lower()} BEFORE {event} ON audit_log "
                "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END"
            )


def _v2_admin_token_scopes(conn: sa.Connection) -> None:
    """Admin tokens get scopes. A token made before scopes existed could do everything, so it
    keeps every scope and an upgrade changes nothing. The column's default is the empty set (no
    rights), so a row written without scopes fails closed; PostgreSQL drops the default once the
    rows are filled (SQLite cannot alter a column; its default stays '')."""
    conn.exec_driver_sql(
        "ALTER TABLE admin_tokens ADD COLUMN scopes VARCHAR(200) NOT NULL DEFAULT ''"
    )
    # Frozen: the scopes of this release, spelled out (a later scope is granted by its own step).
    conn.execute(
        sa.text("UPDATE admin_tokens SET scopes = :scopes"),
        {"scopes": "model-admin policy-admin read seal token-admin"},
    )
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("ALTER TABLE admin_tokens ALTER COLUMN scopes DROP DEFAULT")


def _v3_store_identity(conn: sa.Connection) -> None:
    """The store's instance id (random, made once): ``keyserver init`` writes it into the data
    directory, and ``keyserver serve`` refuses a database whose id does not match (a foreign
    database). ``probed_at`` is written by the readiness probe (a commit that proves the store
    can write). A store made before this step gets its id now; its data directory adopts it on
    the next start."""
    md = sa.MetaData()
    identity = sa.Table(
        "store_identity",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("instance_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("probed_at", sa.BigInteger, nullable=False),
        sa.CheckConstraint("id = 1", name="ck_store_identity_single_row"),
    )
    md.create_all(conn)
    micros = int(datetime.now(UTC).timestamp() * 1_000_000)
    conn.execute(
        sa.insert(identity).values(
            id=1, instance_id=secrets.token_hex(16), created_at=micros, probed_at=micros
        )
    )


def _v4_stateless_nonces(conn: sa.Connection) -> None:
    """Challenge nonces carry their own proof (``sealtorch.keyserver.nonces``): the table of
    issued nonces goes, a table of spent ones comes, and the store gets a column for its
    wrapped nonce key (written by the first key server that starts: it needs the master key).
    Nonces issued before the upgrade are refused (their clients ask again)."""
    conn.exec_driver_sql("DROP TABLE nonces")
    md = sa.MetaData()
    sa.Table(
        "spent_nonces",
        md,
        sa.Column("nonce", sa.LargeBinary, primary_key=True),
        sa.Column("expires_at", UtcMicros, nullable=False),
        sa.Index("ix_spent_nonces_expires_at", "expires_at"),
    )
    md.create_all(conn)
    blob = sa.LargeBinary().compile(dialect=conn.dialect)
    conn.exec_driver_sql(f"ALTER TABLE store_identity ADD COLUMN nonce_key {blob}")


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema", _v1_initial),
    Migration(2, "admin token scopes", _v2_admin_token_scopes),
    Migration(3, "store identity", _v3_store_identity),
    Migration(4, "stateless challenge nonces", _v4_stateless_nonces),
)


def latest_version(migrations: Sequence[Migration] = MIGRATIONS) -> int:
    return migrations[-1].version if migrations else 0


_VERSIONS = sa.Table(
    "schema_migrations",
    sa.MetaData(),
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("applied_at", UtcMicros, nullable=False),
)


def applied_version(conn: sa.Connection) -> int:
    """The schema version of the database (0 when it has never been migrated)."""
    if not sa.inspect(conn).has_table("schema_migrations"):
        return 0
    value = conn.execute(sa.select(sa.func.max(_VERSIONS.c.version))).scalar()
    return int(value or 0)


def run_migrations(
    conn: sa.Connection,
    migrations: Sequence[Migration] = MIGRATIONS,
    *,
    now: datetime | None = None,
) -> int:
    """Apply every pending step inside the caller's (write) transaction; returns the version.

    The caller commits. On PostgreSQL the transaction-scoped advisory lock is taken first.
    """
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise StorageError("internal error: migration steps must be numbered 1, 2, 3, ...")
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK_KEY})
    _VERSIONS.create(conn, checkfirst=True)
    current = applied_version(conn)
    latest = latest_version(migrations)
    if current > latest:
        raise StorageError(
            f"the key store's schema is version {current}, newer than this sealtorch knows "
            f"({latest}); upgrade sealtorch on this machine before using the database"
        )
    stamp = now or datetime.now(UTC)
    for migration in migrations[current:]:
        migration.apply(conn)
        conn.execute(
            sa.insert(_VERSIONS).values(
                version=migration.version, name=migration.name, applied_at=stamp
            )
        )
    return latest
