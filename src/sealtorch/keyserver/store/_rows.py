"""Rows <-> records: each record's fields are mapped to their columns once, here.

A :class:`RowMap` names, for one record type, the columns whose name differs from the field's
and the conversions that differ from "as is"; it turns a row into the record (``record``) and a
record into the values of an insert (``row``). The wire form of a record is the protocol's
business (``sealtorch.protocol``), not the store's.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

from sealtorch.errors import ConfigError
from sealtorch.keyserver.records import (
    AdminTokenRecord,
    KeyState,
    KeyVersionRecord,
    ModelRecord,
    PolicyRecord,
    SessionRecord,
    WrappedKey,
)
from sealtorch.keyserver.store import _schema as t
from sealtorch.protocol.admin import AdminScope
from sealtorch.protocol.audit import AuditRecord

__all__ = [
    "ADMIN_TOKEN",
    "AUDIT",
    "KEY_VERSION",
    "MODEL",
    "POLICY",
    "SESSION",
    "WRAPPED_KEY",
    "RowMap",
    "check_token_fields",
    "digest",
    "scopes_text",
]

# SQLAlchemy's Row is generic over its column types; the maps read it by name.
Row = Any
_R = TypeVar("_R")
_Convert = Callable[[Any], Any]

_TOKEN_ID = re.compile(r"^[0-9a-f]{16}$")
_SCOPE_NAMES = frozenset(scope.value for scope in AdminScope)


class RowMap(Generic[_R]):
    """The columns of one record type (see the module docstring)."""

    def __init__(
        self,
        record: type[_R],
        *,
        columns: Mapping[str, str] | None = None,
        load: Mapping[str, _Convert] | None = None,
        dump: Mapping[str, _Convert] | None = None,
    ) -> None:
        columns = columns or {}
        load = load or {}
        dump = dump or {}
        names = [f.name for f in dataclasses.fields(record)]  # type: ignore[arg-type]
        self._type = record
        # (field, column, row value -> field value, field value -> column value)
        self._fields = tuple(
            (name, columns.get(name, name), load.get(name), dump.get(name)) for name in names
        )

    def record(self, row: Row) -> _R:
        """The record of a row that has every mapped column."""
        values: dict[str, Any] = {}
        for name, column, convert, _ in self._fields:
            value = getattr(row, column)
            values[name] = value if convert is None else convert(value)
        return self._type(**values)

    def row(self, record: _R, **extra: Any) -> dict[str, Any]:
        """The column values of ``record`` (plus ``extra`` columns, e.g. secrets)."""
        values: dict[str, Any] = {}
        for name, column, _, convert in self._fields:
            value = getattr(record, name)
            values[column] = value if convert is None else convert(value)
        values.update(extra)
        return values


def _state_value(state: KeyState) -> str:
    return state.value


def _load_scopes(text: Any) -> frozenset[AdminScope]:
    # Fail closed: a name this code does not know grants nothing.
    return frozenset(AdminScope(n) for n in str(text).split() if n in _SCOPE_NAMES)


def _dump_scopes(scopes: Iterable[AdminScope]) -> str:
    return " ".join(sorted(str(scope) for scope in scopes))


def _load_model_ids(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(json.loads(text))


def _dump_model_ids(ids: tuple[str, ...] | None) -> str | None:
    return None if ids is None else json.dumps(list(ids))


MODEL: RowMap[ModelRecord] = RowMap(ModelRecord)
KEY_VERSION: RowMap[KeyVersionRecord] = RowMap(
    KeyVersionRecord, load={"state": KeyState}, dump={"state": _state_value}
)
WRAPPED_KEY: RowMap[WrappedKey] = RowMap(
    WrappedKey,
    columns={"blob": "wrapped_dek"},
    load={"state": KeyState, "blob": bytes},
    dump={"state": _state_value},
)
POLICY: RowMap[PolicyRecord] = RowMap(PolicyRecord)
ADMIN_TOKEN: RowMap[AdminTokenRecord] = RowMap(
    AdminTokenRecord, load={"scopes": _load_scopes}, dump={"scopes": _dump_scopes}
)
SESSION: RowMap[SessionRecord] = RowMap(
    SessionRecord,
    columns={"claims_json": "claims"},
    load={"public_key": bytes, "model_ids": _load_model_ids},
    dump={"model_ids": _dump_model_ids},
)
AUDIT: RowMap[AuditRecord] = RowMap(
    AuditRecord,
    columns={
        "claims_json": "claims",
        "model_ids_json": "model_ids",
        "reasons_json": "reasons",
        "details_json": "details",
    },
    load={"seq": int, "at": lambda micros: t.from_micros(int(micros))},
    dump={"at": t.to_micros},
)


def digest(row: Row) -> bytes:
    """The ``digest`` column (token and session digests; never part of a record)."""
    return bytes(row.digest)


def scopes_text(scopes: Iterable[AdminScope | str]) -> str:
    """The stored form of a token's scopes: sorted names, space-separated; at least one."""
    names = sorted({str(scope) for scope in scopes})
    if not names:
        raise ConfigError("an admin token needs at least one scope")
    unknown = [name for name in names if name not in _SCOPE_NAMES]
    if unknown:
        raise ConfigError(f"unknown admin token scope {unknown[0][:64]!r}")
    return " ".join(names)


def check_token_fields(token_id: str, token_digest: bytes) -> None:
    if not _TOKEN_ID.fullmatch(token_id):
        raise ConfigError("a token id is 16 lowercase hex characters")
    if len(token_digest) != 32:
        raise ConfigError("a token digest is 32 bytes (SHA-256)")
