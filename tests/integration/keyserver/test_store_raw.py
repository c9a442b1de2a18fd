"""The group commit's statements on the database driver (store/_raw.py) find and write exactly
what the SQLAlchemy statements of store/_statements.py do, on SQLite and PostgreSQL: the release
material of live, deleted, policy-less and unknown models (revoked and destroyed keys left out),
the consumed nonces with their expiry, and audit records that continue the chain."""

from __future__ import annotations

import json
import os
from datetime import timedelta

from _fixtures.clock import FakeClock
from _fixtures.keystore import admin_entry, make_wrapper, release_entry
from sealtorch.keyserver.masterkey import FileMasterKey
from sealtorch.keyserver.store import Store
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


def test_consumed_nonces_and_their_expiry(store: Store, clock: FakeClock) -> None:
    nonces = [os.urandom(32) for _ in range(3)]
    for index, nonce in enumerate(nonces[:2]):
        store.add_nonce(nonce, expires_at=clock.now + timedelta(seconds=60 + index))
    raw = RawStatements(store.backend)
    with store._write_lock, store._begin_write() as conn:  # type: ignore[attr-defined]
        consumed = raw.consume_nonces(conn, nonces)
    assert consumed == {
        nonces[0]: clock.now + timedelta(seconds=60),
        nonces[1]: clock.now + timedelta(seconds=61),
    }  # the third was never issued
    with store._write_lock, store._begin_write() as conn:  # type: ignore[attr-defined]
        assert raw.consume_nonces(conn, nonces) == {}  # consumed once only
        raw.add_nonces(
            conn,
            [{"nonce": nonces[2], "created_at": clock.now, "expires_at": clock.now}],
        )
    with store._write_lock, store._begin_write() as conn:  # type: ignore[attr-defined]
        assert raw.consume_nonces(conn, [nonces[2]]) == {nonces[2]: clock.now}


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
