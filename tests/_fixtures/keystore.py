"""Helpers for key store tests: real wrapped keys, audit entries, an old database."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from sealtorch.keys import DataKey, generate_key
from sealtorch.keyserver.masterkey import MasterKey, wrap_aad
from sealtorch.keyserver.records import WrapFunction, WrappedDek
from sealtorch.keyserver.store._migrations import MIGRATIONS, run_migrations
from sealtorch.keyserver.store._schema import to_micros
from sealtorch.keyserver.tokens import TokenKind, issue_token
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
    engine = store.engine
    with engine.begin() as conn:
        for statement in ddl:
            conn.exec_driver_sql(statement)
    return engine


def database_before_scopes(url: str, *, name: str) -> str:
    """Make the database at ``url`` what a key server from before admin token scopes left:
    schema version 1 with one admin token row written as that version wrote it. Returns the
    token."""
    issued = issue_token(TokenKind.ADMIN)
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            assert run_migrations(conn, MIGRATIONS[:1]) == 1
            conn.execute(
                sa.text(
                    "INSERT INTO admin_tokens (token_id, digest, name, created_at) "
                    "VALUES (:token_id, :digest, :name, :created_at)"
                ),
                {
                    "token_id": issued.token_id,
                    "digest": issued.digest,
                    "name": name,
                    "created_at": to_micros(datetime.now(UTC)),
                },
            )
    finally:
        engine.dispose()
    return issued.token
