"""SQLite specifics: a private file, WAL, foreign keys, durability; and store URLs."""

from __future__ import annotations

import base64
import sqlite3
import stat
from pathlib import Path

import pytest
import sqlalchemy as sa

from _fixtures.keystore import admin_entry, make_wrapper
from sealtorch.errors import ConfigError
from sealtorch.keys import generate_key
from sealtorch.keyserver.masterkey import FileMasterKey
from sealtorch.keyserver.store import open_store, sqlite_url


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "keys.db"


def test_database_files_are_private(db: Path, master: FileMasterKey) -> None:
    store = open_store(sqlite_url(db))
    try:
        store.migrate()
        with store.transaction() as tx:
            tx.create_model("m", wrap=make_wrapper(master, "m"))
            tx.append_audit(admin_entry("model.create", "m"))
        files = [p for p in db.parent.iterdir() if p.name.startswith("keys.db")]
        assert {p.name for p in files} >= {"keys.db", "keys.db-wal"}
        for path in files:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    finally:
        store.close()


def test_connection_settings(db: Path) -> None:
    store = open_store(sqlite_url(db), busy_timeout=3.5)
    try:
        store.migrate()
        engine: sa.Engine = store.engine
        with engine.connect() as conn:
            pragma = {
                name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "foreign_keys", "synchronous", "busy_timeout")
            }
        assert pragma == {
            "journal_mode": "wal",
            "foreign_keys": 1,
            "synchronous": 2,
            "busy_timeout": 3500,
        }
    finally:
        store.close()


def test_foreign_keys_are_enforced(db: Path) -> None:
    store = open_store(sqlite_url(db))
    try:
        store.migrate()
        engine: sa.Engine = store.engine
        with pytest.raises(sa.exc.IntegrityError, match="FOREIGN KEY"), engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO key_versions (model_id, version, state, wrapped_dek, wrap_key_id, "
                "fingerprint, created_at) VALUES ('ghost', 1, 'active', x'00', 'k', 'f', 0)"
            )
    finally:
        store.close()


def test_committed_change_survives_a_reopen(db: Path, master: FileMasterKey) -> None:
    store = open_store(sqlite_url(db))
    store.migrate()
    with store.transaction() as tx:
        tx.create_model("durable", wrap=make_wrapper(master, "durable"))
        tx.append_audit(admin_entry("model.create", "durable"))
    store.close()
    again = open_store(sqlite_url(db))
    try:
        again.check_schema()
        assert again.get_model("durable") is not None
        assert again.audit_head().seq == 1
    finally:
        again.close()


def test_plaintext_data_key_never_reaches_the_database_files(
    db: Path, master: FileMasterKey
) -> None:
    deks = [generate_key() for _ in range(3)]
    store = open_store(sqlite_url(db))
    try:
        store.migrate()
        with store.transaction() as tx:
            tx.create_model("m", wrap=make_wrapper(master, "m", deks[0]))
            tx.append_audit(admin_entry("model.create", "m"))
        for dek in deks[1:]:
            with store.transaction() as tx:
                tx.add_key_version("m", wrap=make_wrapper(master, "m", dek))
                tx.append_audit(admin_entry("key.rotate", "m"))
        contents = b"".join(p.read_bytes() for p in db.parent.iterdir() if p.is_file())
        for dek in deks:
            for form in (
                dek.material,
                dek.material.hex().encode(),
                base64.b64encode(dek.material),
                base64.urlsafe_b64encode(dek.material).rstrip(b"="),
            ):
                assert form not in contents
    finally:
        store.close()


def test_readers_are_not_blocked_by_a_writer(db: Path, master: FileMasterKey) -> None:
    """WAL: a long write transaction elsewhere does not stop reads."""
    store = open_store(sqlite_url(db), busy_timeout=0.2)
    try:
        store.migrate()
        with store.transaction() as tx:
            tx.create_model("m", wrap=make_wrapper(master, "m"))
            tx.append_audit(admin_entry("model.create", "m"))
        other = sqlite3.connect(db, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("UPDATE models SET created_at = created_at")
            assert store.get_model("m") is not None
            assert len(store.active_wrapped_keys("m")) == 1
        finally:
            other.execute("ROLLBACK")
            other.close()
    finally:
        store.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite://", "must be a file"),
        ("sqlite:///:memory:", "must be a file"),
        ("sqlite:////no/such/dir/keys.db", "does not exist"),
        ("mysql://u:p@localhost/db", "unsupported store backend"),
        ("not a url", "not valid"),
        ("postgresql+asyncpg://u:p@localhost/db", "psycopg 3"),
    ],
)
def test_bad_store_urls(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        open_store(url)


def test_bad_synchronous_mode(db: Path) -> None:
    with pytest.raises(ConfigError, match="sqlite_synchronous"):
        open_store(sqlite_url(db), sqlite_synchronous="OFF")
