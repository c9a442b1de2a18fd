"""Schema migrations on SQLite and PostgreSQL: fresh, older, newer, failing, drift-free; admin
token scopes (step 2) for tokens from before them; stateless nonces (step 4)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from _fixtures.keystore import admin_entry, database_before_scopes, make_wrapper
from sealtorch.errors import ConfigError, StorageError
from sealtorch.keyserver.masterkey import FileMasterKey
from sealtorch.keyserver.nonces import load_nonce_key
from sealtorch.keyserver.store import Store, open_store
from sealtorch.keyserver.store import _schema as schema
from sealtorch.keyserver.store._migrations import MIGRATIONS, Migration, run_migrations
from sealtorch.keyserver.tokens import TokenKind, authenticate_admin, issue_token
from sealtorch.protocol.admin import ADMIN_SCOPES


def _engine(store: Store) -> sa.Engine:
    engine: sa.Engine = store.engine
    return engine


def _write(store: Store) -> sa.Connection:
    return _engine(store).connect().execution_options(sealtorch_write=True)


def test_empty_database_upgrades_to_latest(store_url: str) -> None:
    store = open_store(store_url)
    try:
        assert store.schema_version() == 0
        assert store.migrate() == len(MIGRATIONS)
        store.check_schema()
        names = set(sa.inspect(_engine(store)).get_table_names())
        assert set(schema.metadata.tables) <= names
        assert store.audit_head().seq == 0
        with _engine(store).connect() as conn:
            rows = conn.execute(sa.text("SELECT version, name FROM schema_migrations")).all()
        assert [(r.version, r.name) for r in rows] == [(m.version, m.name) for m in MIGRATIONS]
    finally:
        store.close()


def test_migrated_schema_matches_the_code(store: Store) -> None:
    """Drift check: the tables the migrations built are the tables _schema.py declares."""
    inspector = sa.inspect(_engine(store))
    for name, table in schema.metadata.tables.items():
        columns = {c["name"]: c for c in inspector.get_columns(name)}
        assert set(columns) == {c.name for c in table.columns}, name
        for column in table.columns:
            assert columns[column.name]["nullable"] == column.nullable, (name, column.name)
        primary = inspector.get_pk_constraint(name)["constrained_columns"]
        assert primary == [c.name for c in table.primary_key.columns], name
        indexes = {i["name"] for i in inspector.get_indexes(name)}
        assert {i.name for i in table.indexes} <= indexes, name
        foreign = {
            (tuple(fk["constrained_columns"]), fk["referred_table"])
            for fk in inspector.get_foreign_keys(name)
        }
        assert foreign == {
            (tuple(fk.parent.name for fk in c.elements), c.referred_table.name)
            for c in table.foreign_key_constraints
        }, name


def test_older_database_is_upgraded_in_place(store: Store, master: FileMasterKey) -> None:
    """A database at the current version holding data meets code with one more step."""
    with store.transaction() as tx:
        tx.create_model("kept", wrap=make_wrapper(master, "kept"))
        tx.append_audit(admin_entry("model.create", "kept"))

    def v2(conn: sa.Connection) -> None:
        conn.execute(sa.text("ALTER TABLE models ADD COLUMN description VARCHAR(200)"))
        conn.execute(sa.text("UPDATE models SET description = 'migrated'"))

    nxt = len(MIGRATIONS) + 1
    steps = (*MIGRATIONS, Migration(nxt, "model descriptions", v2))
    with _write(store) as conn, conn.begin():
        assert run_migrations(conn, steps, now=datetime.now(UTC)) == nxt
    with _write(store) as conn, conn.begin():
        assert run_migrations(conn, steps) == nxt  # nothing left to do
    with _engine(store).connect() as conn:
        assert conn.execute(sa.text("SELECT description FROM models")).scalar() == "migrated"
        versions = conn.execute(sa.text("SELECT version FROM schema_migrations")).scalars()
        assert sorted(versions) == list(range(1, nxt + 1))
    assert store.get_model("kept") is not None  # data and audit survive
    assert store.audit_head().seq == 1


def test_failed_step_leaves_the_old_schema(store_url: str) -> None:
    def broken(conn: sa.Connection) -> None:
        conn.execute(sa.text("CREATE TABLE half_done (x INTEGER)"))
        raise RuntimeError("step 2 failed")

    store = open_store(store_url)
    try:
        broken_step = Migration(len(MIGRATIONS) + 1, "broken", broken)
        with (
            pytest.raises(RuntimeError, match="step 2 failed"),
            _write(store) as conn,
            conn.begin(),
        ):
            run_migrations(conn, (*MIGRATIONS, broken_step))
        assert store.schema_version() == 0  # even step 1 was rolled back with it
        tables = set(sa.inspect(_engine(store)).get_table_names())
        assert "half_done" not in tables
        assert "models" not in tables
        assert store.migrate() == len(MIGRATIONS)
    finally:
        store.close()


def test_newer_database_is_refused(store: Store) -> None:
    with _engine(store).begin() as conn:
        conn.execute(
            sa.text("INSERT INTO schema_migrations (version, name, applied_at) VALUES (7, 'x', 0)")
        )
    with pytest.raises(StorageError, match="newer than this sealtorch"):
        store.migrate()
    with pytest.raises(StorageError, match="upgrade sealtorch"):
        store.check_schema()


def test_misnumbered_steps_are_refused(store: Store) -> None:
    with pytest.raises(StorageError, match="numbered"), _write(store) as conn, conn.begin():
        run_migrations(conn, (Migration(2, "gap", lambda c: None),))


def test_admin_tokens_from_before_scopes_keep_every_scope(store_url: str) -> None:
    """Upgrading changes nothing for existing tokens: migration 2 gives them every scope. A
    row written without scopes after it (an old replica still running, a hand-made insert)
    grants nothing: SQLite fills in no scopes, PostgreSQL refuses the row."""
    old_token = database_before_scopes(store_url, name="from before scopes")
    store = open_store(store_url)
    try:
        assert store.schema_version() == 1
        assert store.migrate() == len(MIGRATIONS)
        record = authenticate_admin(store, old_token, now=datetime.now(UTC))
        assert record.name == "from before scopes"
        assert record.scopes == frozenset(ADMIN_SCOPES)
        issued = issue_token(TokenKind.ADMIN)
        insert = sa.text(
            "INSERT INTO admin_tokens (token_id, digest, name, created_at) "
            "VALUES (:token_id, :digest, 'no scopes', 0)"
        )
        values = {"token_id": issued.token_id, "digest": issued.digest}
        if store.backend == "sqlite":
            with _write(store) as conn, conn.begin():
                conn.execute(insert, values)
            unscoped = authenticate_admin(store, issued.token, now=datetime.now(UTC))
            assert unscoped.scopes == frozenset()
        else:
            with pytest.raises(sa.exc.IntegrityError), _write(store) as conn, conn.begin():
                conn.execute(insert, values)
    finally:
        store.close()


def test_stateless_nonces_upgrade_drops_issued_nonces(
    store_url: str, master: FileMasterKey
) -> None:
    """Step 4: the table of issued nonces goes (a nonce issued before the upgrade is refused:
    its client asks again), spent nonces get their table, and the first key server to start
    stores the nonce key, wrapped by its master key; a second start reads the same key."""
    engine = sa.create_engine(store_url)
    try:
        with engine.begin() as conn:
            run_migrations(conn, MIGRATIONS[:3])
            conn.execute(
                sa.text("INSERT INTO nonces (nonce, created_at, expires_at) VALUES (:n, 0, 1)"),
                {"n": b"\x01" * 32},
            )
    finally:
        engine.dispose()
    store = open_store(store_url)
    try:
        assert store.schema_version() == 3
        assert store.migrate() == len(MIGRATIONS)
        tables = set(sa.inspect(_engine(store)).get_table_names())
        assert "nonces" not in tables
        assert "spent_nonces" in tables
        first = load_nonce_key(store.nonce_key, master)
        second = load_nonce_key(store.nonce_key, master)
        nonce, _ = first.issue(now=datetime.now(UTC), ttl=timedelta(seconds=60))
        assert second.expiry(nonce) is not None  # one key for every replica of the store
        with pytest.raises(ConfigError, match="another master key"):
            load_nonce_key(store.nonce_key, FileMasterKey(b"\x02" * 32))
    finally:
        store.close()
