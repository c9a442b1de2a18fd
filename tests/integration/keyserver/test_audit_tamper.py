"""The attacker has the database: edits the audit log in SQL. verify_log must notice.

Also: fail closed — when the audit record cannot be written, the change it describes does not
happen either.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
import sqlalchemy as sa

from _fixtures.clock import FakeClock
from _fixtures.keystore import admin_entry, make_wrapper, release_entry
from sealtorch.errors import AuditError
from sealtorch.keyserver.masterkey import FileMasterKey
from sealtorch.keyserver.store import Store, open_store
from sealtorch.protocol.audit import (
    AuditChainError,
    AuditHead,
    build_record,
    verify_log,
)


@pytest.fixture
def filled(store: Store, clock: FakeClock) -> Store:
    for n in range(1, 7):
        clock.advance(seconds=1)
        store.append_audit(release_entry(f"m{n}", request_id=f"r{n}"))
    assert verify_log(store).count == 6
    return store


@pytest.fixture
def attacker(store_url: str) -> Iterator[sa.Engine]:
    """A direct database connection that first removes the append-only triggers."""
    engine = sa.create_engine(store_url)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text("ALTER TABLE audit_log DISABLE TRIGGER USER"))
        else:
            conn.execute(sa.text("DROP TRIGGER audit_log_no_update"))
            conn.execute(sa.text("DROP TRIGGER audit_log_no_delete"))
    yield engine
    engine.dispose()


def _sql(engine: sa.Engine, *statements: str) -> None:
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(sa.text(statement))


def _first_bad(store: Store, **kwargs: AuditHead) -> AuditChainError:
    with pytest.raises(AuditChainError) as info:
        verify_log(store, **kwargs)
    return info.value


def test_updated_field_is_found(filled: Store, attacker: sa.Engine) -> None:
    _sql(attacker, "UPDATE audit_log SET decision = 'deny' WHERE seq = 3")
    error = _first_bad(filled)
    assert (error.seq, error.problem) == (3, "edited")


def test_updated_claims_are_found(filled: Store, attacker: sa.Engine) -> None:
    with attacker.begin() as conn:
        conn.execute(
            sa.text("UPDATE audit_log SET claims = :claims WHERE seq = 5"),
            {"claims": '{"debug":true}'},
        )
    assert _first_bad(filled).seq == 5


def test_deleted_row_is_found(filled: Store, attacker: sa.Engine) -> None:
    _sql(attacker, "DELETE FROM audit_log WHERE seq = 2")
    error = _first_bad(filled)
    assert (error.seq, error.problem) == (2, "missing")


def test_deleted_tail_is_found(filled: Store, attacker: sa.Engine) -> None:
    _sql(attacker, "DELETE FROM audit_log WHERE seq >= 5")
    error = _first_bad(filled)
    assert (error.seq, error.problem) == (5, "missing")


def test_swapped_rows_are_found(filled: Store, attacker: sa.Engine) -> None:
    _sql(
        attacker,
        "UPDATE audit_log SET seq = -2 WHERE seq = 2",
        "UPDATE audit_log SET seq = 2 WHERE seq = 4",
        "UPDATE audit_log SET seq = 4 WHERE seq = -2",
    )
    assert _first_bad(filled).seq == 2


def test_inserted_row_is_found(filled: Store, attacker: sa.Engine, clock: FakeClock) -> None:
    """A forged record appended at the end (correctly chained!) but not via the key server."""
    last = list(filled.iter_audit())[-1]
    forged = build_record(release_entry("stolen"), seq=7, at=clock.now, prev_hash=last.hash)
    with attacker.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO audit_log (seq, at, kind, action, decision, actor, client_address, "
                "request_id, evidence_digest, claims, model_ids, reasons, details, prev_hash, "
                "hash) VALUES (:seq, :at, :kind, :action, :decision, :actor, :client_address, "
                ":request_id, :evidence_digest, :claims, :model_ids, :reasons, :details, "
                ":prev_hash, :hash)"
            ),
            {
                "seq": forged.seq,
                "at": forged.at_micros,
                "kind": forged.kind,
                "action": forged.action,
                "decision": forged.decision,
                "actor": forged.actor,
                "client_address": forged.client_address,
                "request_id": forged.request_id,
                "evidence_digest": forged.evidence_digest,
                "claims": forged.claims_json,
                "model_ids": forged.model_ids_json,
                "reasons": forged.reasons_json,
                "details": forged.details_json,
                "prev_hash": forged.prev_hash,
                "hash": forged.hash,
            },
        )
    error = _first_bad(filled)
    assert (error.seq, error.problem) == (7, "not_in_head")


def test_inserted_row_in_the_middle_is_found(filled: Store, attacker: sa.Engine) -> None:
    _sql(
        attacker,
        "UPDATE audit_log SET seq = seq + 100 WHERE seq >= 4",
        "UPDATE audit_log SET seq = seq - 99 WHERE seq >= 104",
        "INSERT INTO audit_log SELECT 4, at, kind, action, 'allow', actor, client_address, "
        "request_id, evidence_digest, claims, model_ids, reasons, details, prev_hash, hash "
        "FROM audit_log WHERE seq = 3",
    )
    assert _first_bad(filled).seq == 4


def test_rewritten_tail_needs_an_anchor(filled: Store, attacker: sa.Engine) -> None:
    """Delete the tail and move the head back consistently: only an exported anchor shows it."""
    anchor = filled.audit_head()
    records = list(filled.iter_audit())
    _sql(
        attacker,
        "DELETE FROM audit_log WHERE seq >= 5",
    )
    with attacker.begin() as conn:
        conn.execute(sa.text("UPDATE audit_head SET seq = 4, hash = :h"), {"h": records[3].hash})
    assert verify_log(filled).last_seq == 4
    error = _first_bad(filled, expected_head=anchor)
    assert error.problem == "missing"


def test_untouched_log_still_verifies_after_triggers_removed(
    filled: Store, attacker: sa.Engine
) -> None:
    assert verify_log(filled).count == 6


# --- fail closed ------------------------------------------------------------------------------


def _create_model(store: Store, master: FileMasterKey, model_id: str) -> None:
    with store.transaction() as tx:
        tx.create_model(model_id, wrap=make_wrapper(master, model_id))
        tx.append_audit(admin_entry("model.create", model_id))


def _break_audit_inserts(store_url: str) -> None:
    """Make every audit insert fail, as a full disk or a broken replica would."""
    engine = sa.create_engine(store_url)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(
                sa.text(
                    "CREATE FUNCTION broken_audit() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'simulated audit failure'; END $$"
                )
            )
            conn.execute(
                sa.text(
                    "CREATE TRIGGER broken BEFORE INSERT ON audit_log "
                    "FOR EACH ROW EXECUTE FUNCTION broken_audit()"
                )
            )
        else:
            conn.execute(
                sa.text(
                    "CREATE TRIGGER broken BEFORE INSERT ON audit_log "
                    "BEGIN SELECT RAISE(ABORT, 'simulated audit failure'); END"
                )
            )
    engine.dispose()


def test_failed_audit_write_undoes_the_change(
    store: Store, store_url: str, master: FileMasterKey
) -> None:
    _break_audit_inserts(store_url)
    with pytest.raises(AuditError, match="audit record could not be written"):
        _create_model(store, master, "resnet50")
    assert store.get_model("resnet50") is None
    assert store.list_key_versions("resnet50") == []
    with pytest.raises(AuditError):
        store.append_audit(release_entry("resnet50"))
    assert store.audit_head().seq == 0


@pytest.mark.postgres
def test_audit_lock_held_elsewhere_fails_closed(postgres: str, master: FileMasterKey) -> None:
    """Another session holds the chain head (a stuck replica): the append times out and the
    change rolls back instead of waiting forever or committing unaudited."""
    store = open_store(postgres, busy_timeout=0.3)
    store.migrate()
    blocker = sa.create_engine(postgres)
    try:
        with blocker.connect() as conn:
            conn.execute(sa.text("BEGIN"))
            conn.execute(sa.text("SELECT * FROM audit_head WHERE id = 1 FOR UPDATE"))
            with pytest.raises(AuditError, match="could not be written"):
                _create_model(store, master, "m")
            conn.execute(sa.text("ROLLBACK"))
        assert store.get_model("m") is None
        store.append_audit(admin_entry("model.create", "m"))  # works again once released
        assert verify_log(store).count == 1
    finally:
        blocker.dispose()
        store.close()


def test_sqlite_write_lock_held_elsewhere_fails_closed(tmp_path: pytest.TempPathFactory) -> None:
    import sqlite3

    from sealtorch.keyserver.store import sqlite_url

    path = tmp_path / "keys.db"  # type: ignore[operator]
    store = open_store(sqlite_url(path), busy_timeout=0.2)
    store.migrate()
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(AuditError, match="could not be written"):
            store.append_audit(release_entry("m"))
        other.execute("ROLLBACK")
        store.append_audit(release_entry("m"))
        assert verify_log(store).count == 1
    finally:
        other.close()
        store.close()


def test_records_carry_the_server_clock(store: Store, clock: FakeClock) -> None:
    clock.advance(hours=5)
    record = store.append_audit(release_entry("m"))
    assert record.at == clock.now
    clock.advance(seconds=-3600)  # even a clock stepping back cannot reorder the chain
    later = store.append_audit(release_entry("m"))
    assert later.seq == record.seq + 1
    assert later.at == clock.now
    assert later.at < record.at + timedelta(0)
    assert verify_log(store).count == 2
