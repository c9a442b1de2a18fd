"""Values the key store returns: frozen records, never database rows.

The storage layer (``sealtorch.keyserver.store``) converts every row into one of these before it
leaves the store, so nothing above it depends on SQLAlchemy and no secret column can travel by
accident: a wrapped data key only comes back from the dedicated ``Store.get_wrapped_key`` /
``Store.active_wrapped_keys`` methods (as :class:`WrappedKey`, whose ``repr`` hides the blob),
and token digests only from ``Store.admin_token_digest`` / ``Store.session_digest``.

All times are timezone-aware UTC ``datetime`` values with microsecond precision.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sealtorch.errors import ConfigError, Error, KeyAccessError
from sealtorch.protocol.admin import AdminScope

__all__ = [
    "MODEL_ID_PATTERN",
    "AdminTokenRecord",
    "ConflictError",
    "KeyState",
    "KeyVersionRecord",
    "ModelRecord",
    "NotFoundError",
    "PolicyRecord",
    "ReleaseMaterial",
    "SessionRecord",
    "SpentNonce",
    "WrapFunction",
    "WrappedDek",
    "WrappedKey",
    "check_model_id",
    "utc",
]

#: Model ids: letters, digits, '.', '_' and '-'; start with a letter or digit; at most 128.
#: (The same rule as ``sealtorch.protocol.MODEL_ID_PATTERN``.)
MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_MODEL_ID = re.compile(MODEL_ID_PATTERN)


class NotFoundError(KeyAccessError):
    """The model, key version, policy, token or session does not exist (or was deleted)."""


class ConflictError(Error):
    """The change contradicts the stored state (the model exists, the key is already revoked...)."""


def check_model_id(model_id: str) -> str:
    """Return ``model_id`` if it is valid, else raise :class:`~sealtorch.errors.ConfigError`."""
    if not _MODEL_ID.fullmatch(str(model_id)) or not isinstance(model_id, str):
        raise ConfigError(
            f"invalid model id {str(model_id)[:200]!r}: use 1-128 letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        )
    return model_id


def utc(value: datetime) -> datetime:
    """``value`` as an aware UTC datetime; naive datetimes are refused (ambiguous)."""
    if value.tzinfo is None:
        raise ValueError("times must be timezone-aware (UTC)")
    return value.astimezone(UTC)


class KeyState(StrEnum):
    """Life cycle of a data key version."""

    #: May be released (subject to the model's policy).
    ACTIVE = "active"
    #: Never released again; still held so that files sealed under it can be rewrapped.
    REVOKED = "revoked"
    #: The wrapped key was erased (model deleted): crypto-shredded, unrecoverable.
    DESTROYED = "destroyed"


@dataclass(frozen=True, slots=True)
class SpentNonce:
    """A challenge nonce a release spends: one the key server issued (its MAC checked, see
    :mod:`sealtorch.keyserver.nonces`), with its expiry (its row may go after that)."""

    value: bytes
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class ModelRecord:
    model_id: str
    created_at: datetime
    deleted_at: datetime | None = None

    @property
    def deleted(self) -> bool:
        return self.deleted_at is not None


@dataclass(frozen=True, slots=True)
class KeyVersionRecord:
    """A data key version, without its key material."""

    model_id: str
    version: int
    state: KeyState
    #: ``MasterKey.key_id`` of the master key that wrapped it.
    wrap_key_id: str
    #: ``DataKey.fingerprint`` (one-way, safe to show).
    fingerprint: str
    created_at: datetime
    revoked_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class WrappedDek:
    """What the service hands the store for a new key version (already wrapped)."""

    blob: bytes = field(repr=False)
    wrap_key_id: str
    fingerprint: str

    def __repr__(self) -> str:
        return (
            f"WrappedDek(<{len(self.blob)} bytes>, wrap_key_id={self.wrap_key_id!r}, "
            f"fingerprint={self.fingerprint!r})"
        )


#: Called by the store, inside its transaction, with the version number it allocated; returns
#: the data key wrapped with ``wrap_aad(model_id, version)``.
WrapFunction = Callable[[int], WrappedDek]


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """A key version *with* its wrapped key material (only from the dedicated store methods)."""

    model_id: str
    version: int
    state: KeyState
    wrap_key_id: str
    fingerprint: str
    blob: bytes = field(repr=False)

    def __repr__(self) -> str:
        return (
            f"WrappedKey({self.model_id!r}, v{self.version}, {self.state.value}, "
            f"wrap_key_id={self.wrap_key_id!r}, <{len(self.blob)} bytes>)"
        )


@dataclass(frozen=True, slots=True)
class PolicyRecord:
    """One version of a model's release policy (the document as stored, JSON text)."""

    model_id: str
    version: int
    document: str
    #: SHA-256 (hex) of the UTF-8 document.
    digest: str
    created_at: datetime

    def parsed(self) -> Any:
        return json.loads(self.document)


@dataclass(frozen=True, slots=True)
class ReleaseMaterial:
    """Everything the release path needs for one model, read in one consistent snapshot.

    ``model`` is ``None`` for an unknown or deleted model (then ``policy`` is ``None`` and
    ``keys`` empty); ``policy`` is the current policy (``None``: no policy, so never released);
    ``keys`` are the active versions with their wrapped keys, oldest first.
    """

    model_id: str
    model: ModelRecord | None
    policy: PolicyRecord | None
    keys: tuple[WrappedKey, ...]


@dataclass(frozen=True, slots=True)
class AdminTokenRecord:
    """An admin bearer token, without its digest."""

    token_id: str
    name: str
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    #: What the token may do; empty means nothing (an unknown stored scope is dropped).
    scopes: frozenset[AdminScope] = frozenset()

    def usable_at(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """A renewal session: bound to the HPKE public key and the claims of the original release."""

    token_id: str
    hpke_suite: str
    public_key: bytes
    #: Canonical JSON of the verified claims recorded at release time.
    claims_json: str
    #: SHA-256 (hex) of ``claims_json``.
    claims_digest: str
    evidence_digest: str | None
    #: Model ids the session may renew; ``None`` means every model the claims may receive.
    model_ids: tuple[str, ...] | None
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None = None

    def claims(self) -> dict[str, Any]:
        value = json.loads(self.claims_json)
        if not isinstance(value, dict):  # pragma: no cover - the store only writes objects
            raise TypeError("stored claims are not a JSON object")
        return value

    def usable_at(self, now: datetime) -> bool:
        return self.revoked_at is None and now < self.expires_at
