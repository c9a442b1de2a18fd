"""Helpers for key store tests: real wrapped keys and audit entries."""

from __future__ import annotations

from typing import Any

from sealtorch.keys import DataKey, generate_key
from sealtorch.keyserver.masterkey import MasterKey, wrap_aad
from sealtorch.keyserver.records import WrapFunction, WrappedDek
from sealtorch.protocol.audit import AuditEntry, AuditKind

ADMIN_ACTOR = "0123456789abcdef"


def make_wrapper(master: MasterKey, model_id: str, dek: DataKey | None = None) -> WrapFunction:
    """A WrapFunction that wraps ``dek`` (a new key by default) for the allocated version."""
    key = dek or generate_key()

    def wrap(version: int) -> WrappedDek:
        return WrappedDek(
            blob=master.wrap(key, wrap_aad(model_id, version)),
            wrap_key_id=master.key_id,
            fingerprint=key.fingerprint,
        )

    return wrap


def admin_entry(action: str, *model_ids: str, decision: str = "ok") -> AuditEntry:
    return AuditEntry(
        kind=AuditKind.ADMIN,
        action=action,
        decision=decision,
        actor=ADMIN_ACTOR,
        model_ids=model_ids,
    )


def release_entry(*model_ids: str, decision: str = "allow", request_id: str = "r") -> AuditEntry:
    return AuditEntry(
        kind=AuditKind.RELEASE,
        action="release",
        decision=decision,
        client_address="127.0.0.1",
        request_id=request_id,
        evidence_digest="ab" * 32,
        claims={"tee": "sim", "mrenclave": "cd" * 32, "debug": False},
        model_ids=model_ids,
        reasons=() if decision == "allow" else ("measurement_mismatch",),
    )


def refuse_audit_inserts(store: Any) -> Any:
    """Make the store's database refuse every audit insert ("disk full"), as a trigger;
    returns the engine (tests drop the trigger ``refuse_audit`` with it)."""
    if store.backend == "sqlite":
        ddl = [
            (
                "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_log "
                "BEGIN SELECT RAISE(ABORT, 'audit disk full'); END"
            )
        ]
    else:
        ddl = [
            (
                "CREATE FUNCTION refuse_audit() RETURNS trigger AS $$ BEGIN "
                "RAISE EXCEPTION 'audit disk full'; END $$ LANGUAGE plpgsql"
            ),
            (
                "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_log "
                "FOR EACH ROW EXECUTE FUNCTION refuse_audit()"
            ),
        ]
    engine = store._engine
    with engine.begin() as conn:
        for statement in ddl:
            conn.exec_driver_sql(statement)
    return engine
