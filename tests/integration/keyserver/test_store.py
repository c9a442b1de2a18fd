"""The key store on a real SQLite file and a real PostgreSQL database (every test runs on both)."""

from __future__ import annotations

import json
import secrets
from datetime import timedelta

import pytest

from _fixtures.clock import FakeClock
from _fixtures.keystore import admin_entry, make_wrapper, release_entry
from sealtorch.errors import AuditError, ConfigError, StorageError
from sealtorch.keys import generate_key
from sealtorch.keyserver.masterkey import FileMasterKey, wrap_aad
from sealtorch.keyserver.records import (
    ConflictError,
    KeyState,
    NotFoundError,
    SpentNonce,
    WrappedKey,
)
from sealtorch.keyserver.store import Store
from sealtorch.keyserver.store._migrations import MIGRATIONS
from sealtorch.keyserver.tokens import TokenKind, issue_token
from sealtorch.protocol.admin import ADMIN_SCOPES, AdminScope
from sealtorch.protocol.audit import verify_chain


def _create(store: Store, master: FileMasterKey, model_id: str = "resnet50") -> None:
    with store.transaction() as tx:
        tx.create_model(model_id, wrap=make_wrapper(master, model_id))
        tx.append_audit(admin_entry("model.create", model_id))


# --- models and key versions ----------------------------------------------------------------


def test_create_model_with_first_key(store: Store, master: FileMasterKey, clock: FakeClock) -> None:
    dek = generate_key()
    with store.transaction() as tx:
        model, key = tx.create_model("resnet50", wrap=make_wrapper(master, "resnet50", dek))
        tx.append_audit(admin_entry("model.create", "resnet50"))
    assert model.model_id == "resnet50"
    assert model.created_at == clock.now
    assert (key.version, key.state, key.fingerprint) == (1, KeyState.ACTIVE, dek.fingerprint)
    assert store.get_model("resnet50") == model
    assert store.list_models() == [model]
    assert store.current_key_version("resnet50") == key
    wrapped = store.get_wrapped_key("resnet50", 1)
    assert wrapped is not None
    assert master.unwrap(wrapped.blob, wrap_aad("resnet50", 1)) == dek
    assert wrapped.wrap_key_id == master.key_id


def test_records_do_not_carry_secret_columns(store: Store, master: FileMasterKey) -> None:
    _create(store, master)
    for record in (*store.list_key_versions("resnet50"), store.current_key_version("resnet50")):
        assert not hasattr(record, "blob")
        assert not hasattr(record, "wrapped_dek")
    wrapped = store.get_wrapped_key("resnet50", 1)
    assert isinstance(wrapped, WrappedKey)
    assert wrapped.blob.hex() not in repr(wrapped)
    assert "61 bytes" in repr(wrapped)
    issued = issue_token(TokenKind.ADMIN)
    with store.transaction() as tx:
        tx.create_admin_token(
            token_id=issued.token_id, digest=issued.digest, name="ops", scopes=[AdminScope.READ]
        )
        tx.append_audit(admin_entry("token.create"))
    listed = store.list_admin_tokens()
    assert not hasattr(listed[0], "digest")
    assert issued.digest.hex() not in repr(listed)
    assert store.admin_token_digest(issued.token_id) == issued.digest


def test_rotation_revocation_and_current_version(
    store: Store, master: FileMasterKey, clock: FakeClock
) -> None:
    _create(store, master)
    deks = {}
    for _ in range(3):
        dek = generate_key()
        with store.transaction() as tx:
            key = tx.add_key_version("resnet50", wrap=make_wrapper(master, "resnet50", dek))
            tx.append_audit(admin_entry("key.rotate", "resnet50"))
        deks[key.version] = dek
    assert sorted(deks) == [2, 3, 4]
    current = store.current_key_version("resnet50")
    assert current is not None
    assert current.version == 4
    clock.advance(seconds=5)
    with store.transaction() as tx:
        revoked = tx.revoke_key_version("resnet50", 4)
        tx.append_audit(admin_entry("key.revoke", "resnet50"))
    assert revoked.state is KeyState.REVOKED
    assert revoked.revoked_at == clock.now
    current = store.current_key_version("resnet50")
    assert current is not None
    assert current.version == 3
    assert [k.version for k in store.active_wrapped_keys("resnet50")] == [1, 2, 3]
    assert [k.state for k in store.list_key_versions("resnet50")] == [
        KeyState.ACTIVE,
        KeyState.ACTIVE,
        KeyState.ACTIVE,
        KeyState.REVOKED,
    ]
    # A revoked version is still readable for rewrapping, marked as revoked.
    still = store.get_wrapped_key("resnet50", 4)
    assert still is not None
    assert still.state is KeyState.REVOKED
    assert master.unwrap(still.blob, wrap_aad("resnet50", 4)) == deks[4]


def test_revoked_key_is_never_in_the_release_set(store: Store, master: FileMasterKey) -> None:
    _create(store, master)
    with store.transaction() as tx:
        tx.revoke_key_version("resnet50", 1)
        tx.append_audit(admin_entry("key.revoke", "resnet50"))
    assert store.active_wrapped_keys("resnet50") == []
    assert store.current_key_version("resnet50") is None
    with pytest.raises(ConflictError, match="already revoked"), store.transaction() as tx:
        tx.revoke_key_version("resnet50", 1)


def test_unknown_models_and_versions(store: Store, master: FileMasterKey) -> None:
    assert store.get_model("nope") is None
    assert store.get_wrapped_key("nope", 1) is None
    assert store.active_wrapped_keys("nope") == []
    with pytest.raises(NotFoundError, match="does not exist"), store.transaction() as tx:
        tx.add_key_version("nope", wrap=make_wrapper(master, "nope"))
    _create(store, master)
    with pytest.raises(NotFoundError, match="no key version 9"), store.transaction() as tx:
        tx.revoke_key_version("resnet50", 9)


def test_duplicate_and_invalid_model_ids(store: Store, master: FileMasterKey) -> None:
    _create(store, master)
    with pytest.raises(ConflictError, match="already exists"):
        _create(store, master)
    for bad in ("", "-x", "a b", "a/b", "x" * 129, "é"):
        with pytest.raises(ConfigError, match="invalid model id"), store.transaction() as tx:
            tx.create_model(bad, wrap=make_wrapper(master, "x"))


def test_delete_model_crypto_shreds_its_keys(store: Store, master: FileMasterKey) -> None:
    _create(store, master)
    with store.transaction() as tx:
        tx.add_key_version("resnet50", wrap=make_wrapper(master, "resnet50"))
        tx.append_audit(admin_entry("key.rotate", "resnet50"))
    with store.transaction() as tx:
        deleted = tx.delete_model("resnet50")
        tx.append_audit(admin_entry("model.delete", "resnet50"))
    assert deleted.deleted
    assert store.get_model("resnet50") is None
    assert store.get_model("resnet50", include_deleted=True) == deleted
    assert store.list_models() == []
    assert store.list_models(include_deleted=True) == [deleted]
    assert store.get_wrapped_key("resnet50", 1) is None
    assert store.active_wrapped_keys("resnet50") == []
    assert {k.state for k in store.list_key_versions("resnet50")} == {KeyState.DESTROYED}
    assert all(k.revoked_at is not None for k in store.list_key_versions("resnet50"))
    with pytest.raises(ConflictError, match="never reused"):
        _create(store, master)
    with pytest.raises(NotFoundError), store.transaction() as tx:
        tx.delete_model("resnet50")


def test_replace_wrapped_key_for_master_key_rotation(
    store: Store, master: FileMasterKey, tmp_path_factory: pytest.TempPathFactory
) -> None:
    dek = generate_key()
    with store.transaction() as tx:
        tx.create_model("m", wrap=make_wrapper(master, "m", dek))
        tx.append_audit(admin_entry("model.create", "m"))
    new_master = FileMasterKey.create(tmp_path_factory.mktemp("new") / "mk")
    old = store.get_wrapped_key("m", 1)
    assert old is not None
    plain = master.unwrap(old.blob, wrap_aad("m", 1))
    with store.transaction() as tx:
        updated = tx.replace_wrapped_key(
            "m", 1, blob=new_master.wrap(plain, wrap_aad("m", 1)), wrap_key_id=new_master.key_id
        )
        tx.append_audit(admin_entry("master.rotate", "m"))
    assert updated.wrap_key_id == new_master.key_id
    again = store.get_wrapped_key("m", 1)
    assert again is not None
    assert new_master.unwrap(again.blob, wrap_aad("m", 1)) == dek


# --- policies -------------------------------------------------------------------------------


def test_policies_are_versioned(store: Store, master: FileMasterKey, clock: FakeClock) -> None:
    _create(store, master)
    assert store.current_policy("resnet50") is None
    documents = [json.dumps({"tee": ["sim"], "rev": n}) for n in range(3)]
    for document in documents:
        clock.advance(seconds=1)
        with store.transaction() as tx:
            tx.set_policy("resnet50", document)
            tx.append_audit(admin_entry("policy.set", "resnet50"))
    current = store.current_policy("resnet50")
    assert current is not None
    assert (current.version, current.document) == (3, documents[2])
    assert current.parsed() == {"tee": ["sim"], "rev": 2}
    first = store.get_policy("resnet50", 1)
    assert first is not None
    assert first.document == documents[0]
    assert [p.version for p in store.list_policies("resnet50")] == [1, 2, 3]
    assert len({p.digest for p in store.list_policies("resnet50")}) == 3
    with pytest.raises(NotFoundError), store.transaction() as tx:
        tx.set_policy("unknown", "{}")
    for bad in ("not json", "[1, 2]"):
        with pytest.raises(ConfigError, match="JSON"), store.transaction() as tx:
            tx.set_policy("resnet50", bad)


# --- audit atomicity (fail closed) --------------------------------------------------------------


def test_change_without_audit_is_rolled_back(store: Store, master: FileMasterKey) -> None:
    with pytest.raises(AuditError, match="without an audit record"), store.transaction() as tx:
        tx.create_model("unaudited", wrap=make_wrapper(master, "unaudited"))
    assert store.get_model("unaudited") is None
    assert store.get_model("unaudited", include_deleted=True) is None


def test_change_after_audit_is_refused_and_rolled_back(store: Store, master: FileMasterKey) -> None:
    def late_change() -> None:
        with store.transaction() as tx:
            tx.append_audit(admin_entry("model.create", "late"))
            tx.create_model("late", wrap=make_wrapper(master, "late"))

    with pytest.raises(AuditError, match="last write"):
        late_change()
    assert store.get_model("late") is None
    assert store.audit_head().seq == 0


def test_error_after_change_rolls_back_change_and_audit(
    store: Store, master: FileMasterKey
) -> None:
    class CrashError(RuntimeError):
        pass

    def crash_before_commit() -> None:
        with store.transaction() as tx:
            tx.create_model("half", wrap=make_wrapper(master, "half"))
            tx.append_audit(admin_entry("model.create", "half"))
            raise CrashError

    with pytest.raises(CrashError):
        crash_before_commit()
    assert store.get_model("half") is None
    assert store.audit_head().seq == 0
    assert list(store.iter_audit()) == []


def test_unencodable_audit_entry_rolls_back_the_change(store: Store, master: FileMasterKey) -> None:
    entry = admin_entry("model.create", "x")
    bad = type(entry)(**{**entry.__dict__, "details": {"raw": b"bytes"}})

    def audited_with_bad_entry() -> None:
        with store.transaction() as tx:
            tx.create_model("x", wrap=make_wrapper(master, "x"))
            tx.append_audit(bad)

    with pytest.raises(TypeError):
        audited_with_bad_entry()
    assert store.get_model("x") is None


def test_audit_records_are_chained(store: Store, master: FileMasterKey, clock: FakeClock) -> None:
    _create(store, master, "a")
    clock.advance(seconds=1)
    store.append_audit(release_entry("a", decision="allow", request_id="r1"))
    clock.advance(seconds=1)
    store.append_audit(release_entry("a", "b", decision="partial", request_id="r2"))
    records = list(store.iter_audit())
    assert [r.seq for r in records] == [1, 2, 3]
    assert [r.action for r in records] == ["model.create", "release", "release"]
    assert records[2].model_ids == ("a", "b")
    assert records[2].reasons == ("measurement_mismatch",)
    assert records[2].claims == {"tee": "sim", "mrenclave": "cd" * 32, "debug": False}
    assert records[1].at == clock.now - timedelta(seconds=1)
    head = store.audit_head()
    assert (head.seq, head.hash) == (3, records[2].hash)
    summary = verify_chain(store.iter_audit(), head=head)
    assert summary.count == 3
    assert [r.seq for r in store.iter_audit(after_seq=1, up_to_seq=2)] == [2]


def test_audit_iteration_crosses_batches(store: Store) -> None:
    with store.transaction() as tx:
        for n in range(1203):
            tx.append_audit(release_entry(f"m{n % 7}", request_id=f"r{n}"))
    head = store.audit_head()
    assert head.seq == 1203
    assert verify_chain(store.iter_audit(), head=head).count == 1203


def test_application_cannot_update_or_delete_audit_rows(store: Store) -> None:
    """The append-only triggers refuse edits through the normal database connection."""
    import sqlalchemy as sa

    store.append_audit(release_entry("m"))
    engine = sa.create_engine(store.engine.url)
    try:
        for statement in ("UPDATE audit_log SET decision = 'deny'", "DELETE FROM audit_log"):
            with pytest.raises(sa.exc.DatabaseError, match="append-only"), engine.begin() as conn:
                conn.execute(sa.text(statement))
    finally:
        engine.dispose()
    assert verify_chain(store.iter_audit(), head=store.audit_head()).count == 1


# --- nonces -----------------------------------------------------------------------------------


def test_nonce_is_spent_exactly_once(store: Store, clock: FakeClock) -> None:
    nonce = SpentNonce(b"\x01" * 32, clock.now + timedelta(seconds=30))
    assert store.spend_nonce(nonce) is True
    assert store.spend_nonce(nonce) is False
    assert store.spend_nonce(SpentNonce(b"\x02" * 32, clock.now)) is True  # another nonce


def test_nonce_key_is_made_once_and_kept(store: Store) -> None:
    made: list[bytes] = []

    def make() -> bytes:
        made.append(secrets.token_bytes(61))
        return made[-1]

    first = store.nonce_key(make)
    assert first == made[0]
    assert store.nonce_key(make) == first  # stored: not made again
    assert len(made) == 1


def test_purge_removes_only_expired_rows(store: Store, clock: FakeClock) -> None:
    store.spend_nonce(SpentNonce(b"\x05" * 32, clock.now + timedelta(seconds=10)))
    kept = SpentNonce(b"\x06" * 32, clock.now + timedelta(seconds=100))
    store.spend_nonce(kept)
    issued = issue_token(TokenKind.SESSION)
    with store.transaction() as tx:
        tx.create_session(
            token_id=issued.token_id,
            digest=issued.digest,
            hpke_suite="DHKEM(X25519,HKDF-SHA256)/HKDF-SHA256/AES-256-GCM",
            public_key=b"\x09" * 32,
            claims_json='{"tee":"sim"}',
            evidence_digest=None,
            model_ids=None,
            expires_at=clock.now + timedelta(seconds=50),
        )
        tx.append_audit(release_entry("m"))
    assert store.purge_expired(now=clock.now + timedelta(seconds=60)) == 2
    assert store.get_session(issued.token_id) is None
    assert store.spend_nonce(kept) is False  # not yet expired: still spent


# --- tokens and sessions --------------------------------------------------------------------


def test_admin_token_lifecycle(store: Store, clock: FakeClock) -> None:
    issued = issue_token(TokenKind.ADMIN)
    with store.transaction() as tx:
        record = tx.create_admin_token(
            token_id=issued.token_id,
            digest=issued.digest,
            name="first admin",
            scopes=[AdminScope.SEAL, AdminScope.READ],
            expires_at=clock.now + timedelta(days=30),
        )
        tx.append_audit(admin_entry("token.create"))
    assert store.get_admin_token(issued.token_id) == record
    assert record.usable_at(clock.now)
    with store.transaction() as tx:
        revoked = tx.revoke_admin_token(issued.token_id)
        tx.append_audit(admin_entry("token.revoke"))
    assert revoked.revoked_at == clock.now
    assert not store.list_admin_tokens()[0].usable_at(clock.now)
    with pytest.raises(ConflictError), store.transaction() as tx:
        tx.revoke_admin_token(issued.token_id)
    with pytest.raises(NotFoundError), store.transaction() as tx:
        tx.revoke_admin_token("ffffffffffffffff")
    with pytest.raises(ConfigError, match="16 lowercase hex"), store.transaction() as tx:
        tx.create_admin_token(token_id="XYZ", digest=issued.digest, name="bad", scopes=ADMIN_SCOPES)


def test_session_binds_key_and_claims(store: Store, clock: FakeClock) -> None:
    issued = issue_token(TokenKind.SESSION)
    claims = '{"debug":false,"mrenclave":"aa","tee":"sim"}'
    with store.transaction() as tx:
        record = tx.create_session(
            token_id=issued.token_id,
            digest=issued.digest,
            hpke_suite="DHKEM(X25519,HKDF-SHA256)/HKDF-SHA256/AES-256-GCM",
            public_key=b"\x07" * 32,
            claims_json=claims,
            evidence_digest="ef" * 32,
            model_ids=["a", "b"],
            expires_at=clock.now + timedelta(minutes=10),
        )
        tx.append_audit(release_entry("a", "b"))
    stored = store.get_session(issued.token_id)
    assert stored == record
    assert stored is not None
    assert stored.public_key == b"\x07" * 32
    assert stored.claims() == {"debug": False, "mrenclave": "aa", "tee": "sim"}
    assert stored.model_ids == ("a", "b")
    assert len(stored.claims_digest) == 64
    assert store.session_digest(issued.token_id) == issued.digest
    with store.transaction() as tx:
        tx.revoke_session(issued.token_id)
        tx.append_audit(release_entry("a", decision="deny"))
    again = store.get_session(issued.token_id)
    assert again is not None
    assert not again.usable_at(clock.now)


# --- lifecycle and errors ---------------------------------------------------------------------


def test_migrate_is_idempotent_and_schema_checked(store: Store) -> None:
    assert store.migrate() == len(MIGRATIONS)
    assert store.schema_version() == len(MIGRATIONS)
    store.check_schema()
    store.ping()
    assert store.backend in {"sqlite", "postgresql"}


def test_unmigrated_database_is_refused(store_url: str) -> None:
    from sealtorch.keyserver.store import open_store

    fresh = open_store(store_url)
    try:
        needs = f"version 0, but this sealtorch needs version {len(MIGRATIONS)}"
        with pytest.raises(StorageError, match=needs):
            fresh.check_schema()
    finally:
        fresh.close()


def test_store_url_in_repr_hides_password(store: Store) -> None:
    text = repr(store)
    if store.backend == "postgresql":
        assert "***" in text
        url = store.engine.url
        assert url.password not in text


# --- the release path's read -----------------------------------------------------------------


def test_release_material_is_one_consistent_view(store: Store, master: FileMasterKey) -> None:
    for model_id in ("a", "b", "c"):
        _create(store, master, model_id)
    with store.transaction() as tx:
        tx.add_key_version("a", wrap=make_wrapper(master, "a"))
        tx.add_key_version("a", wrap=make_wrapper(master, "a"))
        tx.revoke_key_version("a", 3)
        tx.set_policy("a", '{"v": 1}')
        tx.set_policy("a", '{"v": 2}')
        tx.set_policy("c", '{"v": 1}')
        tx.delete_model("c")
        tx.append_audit(admin_entry("setup", "a", "b", "c"))
    material = store.release_material(["d", "a", "b", "c", "a"])
    assert [m.model_id for m in material] == ["d", "a", "b", "c"]
    unknown, a, b, deleted = material
    assert (unknown.model, unknown.policy, unknown.keys) == (None, None, ())
    assert a.model is not None
    assert a.policy is not None
    assert (a.policy.version, a.policy.parsed()) == (2, {"v": 2})
    assert [k.version for k in a.keys] == [1, 2]
    assert all(k.state is KeyState.ACTIVE for k in a.keys)
    assert master.unwrap(a.keys[1].blob, wrap_aad("a", 2)).fingerprint == a.keys[1].fingerprint
    assert b.policy is None  # no policy: the service must deny
    assert [k.version for k in b.keys] == [1]
    assert (deleted.model, deleted.policy, deleted.keys) == (None, None, ())
    everything = store.release_material(None)
    assert [m.model_id for m in everything] == ["a", "b"]
    assert store.release_material([]) == []
    assert "bytes>" in repr(a)
    assert a.keys[0].blob.hex() not in repr(a)


def test_revocation_after_the_read_is_honoured(store: Store, master: FileMasterKey) -> None:
    """release_material() ran, then an admin revoked version 1: the audit transaction's
    recheck must drop it, so it is not released."""
    _create(store, master, "a")
    with store.transaction() as tx:
        tx.add_key_version("a", wrap=make_wrapper(master, "a"))
        tx.append_audit(admin_entry("key.rotate", "a"))
    (material,) = store.release_material(["a"])
    assert [k.version for k in material.keys] == [1, 2]
    with store.transaction() as tx:
        tx.revoke_key_version("a", 1)
        tx.append_audit(admin_entry("key.revoke", "a"))
    with store.transaction() as tx:
        granted = tx.still_active([("a", k.version) for k in material.keys] + [("zz", 1)])
        tx.append_audit(release_entry("a"))
    assert granted == {("a", 2)}

    def recheck_too_late() -> None:
        with store.transaction() as tx:
            tx.append_audit(release_entry("a"))
            tx.still_active([("a", 2)])

    with pytest.raises(AuditError, match="before the audit record"):
        recheck_too_late()
    assert store.audit_head().seq == 4
