"""The group commit's statements on the database driver (store/_raw.py) find and write exactly
what the SQLAlchemy statements of store/_statements.py do, on SQLite and PostgreSQL: the release
material of live, deleted, policy-less and unknown models (revoked and destroyed keys left out),
the spent nonces with their expiry, and audit records that continue the chain."""

from __future__ import annotations

import json
import os
from datetime import timedelta

import sqlalchemy as sa

from _fixtures.clock import FakeClock
from _fixtures.keystore import admin_entry, make_wrapper, release_entry
from sealtorch.keyserver.masterkey import FileMasterKey
from sealtorch.keyserver.records import SpentNonce
from sealtorch.keyserver.store import Store
from sealtorch.keyserver.store import _schema as t
from sealtorch.keyserver.store import _statements as q
from sealtorch.keyserver.store._raw import RawStatements
from sealtorch.protocol.audit import verify_chain


def _models(store: Store, master: FileMasterKey) -> None:
    policy = json.dumps({"version": 1, "allowed_tees": ["sim"]})
    with store.transaction() as tx:
        for model_id in ("live", "bare", "gone"):
            tx.create_model(model_id, wrap=make_wrapper(master, model_id))
        tx.add_key_version("live", wrap=make_wrapper(master, "live"))
        tx.add_key_version("live", wrap=make_wrapper(master, "live"))
        tx.revoke_key_version("live", 2)
        tx.set_policy("live", policy)
        tx.set_policy("live", json.dumps({"version": 1, "allowed_tees": ["sgx"]}))
        tx.set_policy("gone", policy)
        tx.delete_model("gone")
        tx.append_audit(admin_entry("model.create", "live"))


def test_release_material_matches_the_sqlalchemy_statements(
    store: Store, master: FileMasterKey
) -> None:
    _models(store, master)
    raw = RawStatements(store.backend)
    asks = [None, ["live"], ["zz", "gone", "bare", "live"], ["live", "live"], []]
    with store._write_lock, store._begin_write() as conn:  # type: ignore[attr-defined]
        for ids in asks:
            expected = q.read_release_material(conn, ids, locked=True)
            assert raw.release_material(conn, ids) == expected, ids
    with store._write_lock, store._begin_write() as conn:  # type: ignore[attr-defined]
        raw_material = raw.release_material(conn, ["live", "gone", "zz"])
    live = raw_material[0]
    assert [k.version for k in live.keys] == [1, 3]  # revoked version 2 left out
    assert live.policy is not None
    assert live.policy.version == 2
    assert raw_material[1].model is None  # deleted
    assert raw_material[2].model is None  # unknown


def test_spent_nonces_and_their_expiry(store: Store, clock: FakeClock) -> None:
    """The rows the SQLAlchemy schema reads (expiry to the microsecond); a nonce spent before,
    here or through the store, is not returned; the purge reads the expiries it wrote."""
    nonces = [
        SpentNonce(os.urandom(32), clock.now + timedelta(seconds=60, microseconds=index))
        for index in range(3)
    ]
    assert store.spend_nonce(nonces[2]) is True
    raw = RawStatements(store.backend)
    with store._write_lock, store._begin_write() as conn:  # type: ignore[attr-defined]
        assert raw.spend_nonces(conn, nonces) == {nonces[0].value, nonces[1].value}
    with store._write_lock, store._begin_write() as conn:  # type: ignore[attr-defined]
        assert raw.spend_nonces(conn, nonces) == set()  # spent once only
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(t.spent_nonces)).all()
    assert {(bytes(r.nonce), r.expires_at) for r in rows} == {
        (n.value, n.expires_at) for n in nonces
    }
    assert store.purge_expired(now=nonces[1].expires_at) == 2
    assert store.spend_nonce(nonces[2]) is False


def test_audit_records_continue_the_chain(
    store: Store, master: FileMasterKey, clock: FakeClock
) -> None:
    _models(store, master)
    raw = RawStatements(store.backend)
    entries = [release_entry("live", request_id=f"r{n}") for n in range(3)]
    with store._write_lock, store._begin_write() as conn:  # type: ignore[attr-defined]
        written = raw.write_audit(conn, [(e, e.encoded()) for e in entries], at=clock.now)
    stored = list(store.iter_audit())
    assert stored[-3:] == written
    assert store.audit_head().seq == written[-1].seq
    verify_chain(stored)
