"""Each record's fields are mapped to their columns once (``_rows``): a record written as a row
and read back is the same record, and every mapped column exists in the schema."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from sealtorch.keyserver.records import (
    AdminTokenRecord,
    KeyState,
    KeyVersionRecord,
    ModelRecord,
    PolicyRecord,
    SessionRecord,
    WrappedKey,
)
from sealtorch.keyserver.store import _rows
from sealtorch.keyserver.store import _schema as t
from sealtorch.protocol.admin import AdminScope
from sealtorch.protocol.audit import AuditRecord

NOW = datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)

CASES: list[tuple[_rows.RowMap[Any], Any, Any]] = [
    (_rows.MODEL, ModelRecord("m", NOW, NOW), t.models),
    (
        _rows.KEY_VERSION,
        KeyVersionRecord("m", 2, KeyState.REVOKED, "mk1", "ab" * 8, NOW, NOW),
        t.key_versions,
    ),
    (
        _rows.WRAPPED_KEY,
        WrappedKey("m", 1, KeyState.ACTIVE, "mk1", "cd" * 8, b"\x01" * 40),
        t.key_versions,
    ),
    (_rows.POLICY, PolicyRecord("m", 3, '{"a": 1}', "ef" * 32, NOW), t.policies),
    (
        _rows.ADMIN_TOKEN,
        AdminTokenRecord(
            "0123456789abcdef", "ci", NOW, None, None, frozenset({AdminScope.READ})
        ),
        t.admin_tokens,
    ),
    (
        _rows.SESSION,
        SessionRecord(
            "0123456789abcdef", "suite", b"pk", "{}", "00" * 32, None, ("a", "b"), NOW, NOW
        ),
        t.sessions,
    ),
    (
        _rows.AUDIT,
        AuditRecord(
            7, NOW, "admin", "model.create", "ok", "tok", "127.0.0.1", "rid", None, None,
            '["m"]', "[]", None, "00" * 32, "11" * 32,
        ),
        t.audit_log,
    ),
]  # fmt: skip


@pytest.mark.parametrize(("mapping", "record", "table"), CASES)
def test_a_record_survives_its_row(mapping: _rows.RowMap[Any], record: Any, table: Any) -> None:
    row = mapping.row(record)
    assert set(row) <= {column.name for column in table.c}
    assert mapping.record(SimpleNamespace(**row)) == record


def test_unknown_stored_scopes_grant_nothing() -> None:
    row = _rows.ADMIN_TOKEN.row(
        AdminTokenRecord("0123456789abcdef", "x", NOW, scopes=frozenset({AdminScope.SEAL}))
    )
    row["scopes"] = "seal superuser"
    assert _rows.ADMIN_TOKEN.record(SimpleNamespace(**row)).scopes == {AdminScope.SEAL}
