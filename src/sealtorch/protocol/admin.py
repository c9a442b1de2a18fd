"""Wire schemas of the key server's admin API (``docs/keyserver.md``).

Like the release protocol's schemas, these are the only admin types that cross the network: the
service builds them from store records, which never reach a response directly. Requests forbid
unknown fields. Binary values are base64url without padding; times are RFC 3339 UTC.

Admin tokens carry *scopes* (:class:`AdminScope`); each admin route needs one of them
(``docs/keyserver.md`` has the table).
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import Annotated, Any, Final

from pydantic import Field

from sealtorch.errors import ConfigError
from sealtorch.protocol._wire import B64Bytes, ModelId, UtcDatetime, WireModel

__all__ = [
    "ADMIN_SCOPES",
    "SCOPE_RIGHTS",
    "AdminScope",
    "AuditHeadInfo",
    "AuditPage",
    "BodyHeaderWire",
    "CreateModelRequest",
    "CreateTokenRequest",
    "CreatedModel",
    "CreatedToken",
    "KeyBlockWire",
    "KeyVersionInfo",
    "ModelDetail",
    "ModelInfo",
    "PolicyInfo",
    "RewrapRequest",
    "RotateRequest",
    "SetPolicyRequest",
    "TokenInfo",
    "WrapRequest",
    "check_scopes",
]


class AdminScope(StrEnum):
    """What an admin token may do. A token holds a set of scopes; each admin route needs one."""

    #: Wrap and rewrap content keys of existing models (``encrypt``/``rewrap --keyserver``).
    SEAL = "seal"
    #: List and show models, key versions, policies, tokens' metadata; read the audit log.
    READ = "read"
    #: Set release policies; rotate and revoke key versions.
    POLICY_ADMIN = "policy-admin"
    #: Create models and delete them (deleting destroys every key version).
    MODEL_ADMIN = "model-admin"
    #: Create, list and revoke admin tokens (never with a scope the creating token lacks).
    TOKEN_ADMIN = "token-admin"  # noqa: S105 - a scope name, not a password


#: Every scope, in the order they are documented (``keyserver init``'s token holds them all).
ADMIN_SCOPES: Final[tuple[AdminScope, ...]] = tuple(AdminScope)

#: What each scope allows, in words (help texts and error messages).
SCOPE_RIGHTS: Final[dict[AdminScope, str]] = {
    AdminScope.SEAL: "wrap/rewrap content keys of existing models (encrypt/rewrap --keyserver)",
    AdminScope.READ: "list and show models, keys, policies, tokens; read the audit log",
    AdminScope.POLICY_ADMIN: "set release policies; rotate and revoke keys",
    AdminScope.MODEL_ADMIN: "create models; delete them (destroys their keys)",
    AdminScope.TOKEN_ADMIN: "create, list and revoke admin tokens (never with more scopes)",
}


def check_scopes(values: Iterable[str]) -> tuple[AdminScope, ...]:
    """``values`` as scopes (duplicates dropped, documented order); at least one is needed.

    Raises :class:`~sealtorch.errors.ConfigError` listing the scopes for an empty or unknown
    value: a new token never gets "everything" by default.
    """
    given = [str(value) for value in values]
    known = {scope.value for scope in AdminScope}
    unknown = [value for value in given if value not in known]
    if unknown or not given:
        listing = "; ".join(f"{scope.value}: {SCOPE_RIGHTS[scope]}" for scope in ADMIN_SCOPES)
        what = (
            f"unknown scope {unknown[0][:64]!r}"
            if unknown
            else "an admin token needs at least one scope"
        )
        raise ConfigError(f"{what}; choose from (repeat --scope for several): {listing}")
    return tuple(scope for scope in ADMIN_SCOPES if scope.value in given)


_Key32 = Annotated[B64Bytes, Field(min_length=32, max_length=32)]


class CreateModelRequest(WireModel):
    model_id: ModelId
    #: Import this 256-bit data key (from ``sealtorch keygen``) instead of generating one.
    key: _Key32 | None = None


class RotateRequest(WireModel):
    #: Import this key as the new version instead of generating one.
    key: _Key32 | None = None


class KeyVersionInfo(WireModel):
    model_id: ModelId
    version: int
    state: str
    fingerprint: str
    wrap_key_id: str
    created_at: UtcDatetime
    revoked_at: UtcDatetime | None = None


class ModelInfo(WireModel):
    model_id: ModelId
    created_at: UtcDatetime
    current_key_version: int | None = None
    policy_version: int | None = None


class PolicyInfo(WireModel):
    model_id: ModelId
    version: int
    digest: str
    created_at: UtcDatetime
    policy: dict[str, Any]


class ModelDetail(WireModel):
    model: ModelInfo
    keys: tuple[KeyVersionInfo, ...]
    policy: PolicyInfo | None = None


class CreatedModel(WireModel):
    model: ModelInfo
    key: KeyVersionInfo


class SetPolicyRequest(WireModel):
    #: A release policy document (``docs/policy.md``), validated by the server.
    policy: dict[str, Any]


class CreateTokenRequest(WireModel):
    name: Annotated[str, Field(min_length=1, max_length=200)]
    #: What the token may do (at least one; never more than the creating token holds).
    scopes: Annotated[tuple[AdminScope, ...], Field(min_length=1, max_length=16)]
    #: Lifetime in seconds; ``None`` never expires (revoke it when no longer needed).
    expires_in: Annotated[int, Field(ge=60, le=10 * 365 * 86400)] | None = None


class TokenInfo(WireModel):
    token_id: str
    name: str
    #: The token's scopes (:class:`AdminScope` values, documented order).
    scopes: tuple[str, ...] = ()
    created_at: UtcDatetime
    expires_at: UtcDatetime | None = None
    revoked_at: UtcDatetime | None = None


class CreatedToken(WireModel):
    info: TokenInfo
    #: The bearer token; shown once, stored only as a digest.
    token: str


class AuditHeadInfo(WireModel):
    seq: int
    hash: str


class AuditPage(WireModel):
    head: AuditHeadInfo
    #: Records in sequence order, in the export form (``AuditRecord.as_json``).
    records: tuple[dict[str, Any], ...]
    #: Pass as ``after`` to get the next page; ``None`` when this page reached the head.
    next_after: int | None = None


class KeyBlockWire(WireModel):
    """A sealed file's key block (``docs/format.md``): the wrapped content key."""

    key_version: Annotated[int, Field(ge=1, le=2**31 - 1)]
    salt: Annotated[B64Bytes, Field(min_length=32, max_length=32)]
    nonce: Annotated[B64Bytes, Field(min_length=12, max_length=12)]
    wrapped_cek: Annotated[B64Bytes, Field(min_length=48, max_length=48)]


class WrapRequest(WireModel):
    model_id: ModelId
    #: The file's body header digest (``BodyHeader.digest``), bound into the wrap.
    body_digest: Annotated[B64Bytes, Field(min_length=32, max_length=32)]
    #: The file's fresh content key (sent over TLS; the data key never leaves the server).
    cek: _Key32


class BodyHeaderWire(WireModel):
    """A sealed file's public body header (``docs/format.md``)."""

    model_id: ModelId
    plaintext_size: Annotated[int, Field(ge=0, le=2**53 - 1)]
    chunk_size: Annotated[int, Field(ge=64, le=64 * 1024 * 1024)]
    salt: Annotated[B64Bytes, Field(min_length=32, max_length=32)]
    suite: Annotated[str, Field(max_length=64)]


#: The most files a sealed set may have (``docs/format.md``; the server checks every rule of
#: the set block when it rebuilds the header).
_SET_FILES: Final = 512


class SetBlockWire(WireModel):
    """Where a file sits in a sealed set (``docs/format.md``): the first file of a set, the
    one that holds the key, lists the body digests of the others."""

    id: Annotated[B64Bytes, Field(min_length=16, max_length=16)]
    index: Annotated[int, Field(ge=0, lt=_SET_FILES)]
    count: Annotated[int, Field(ge=2, le=_SET_FILES)]
    digests: Annotated[
        list[Annotated[B64Bytes, Field(min_length=32, max_length=32)]],
        Field(max_length=_SET_FILES - 1),
    ] = Field(default_factory=list)


class RewrapRequest(WireModel):
    """A sealed file's public header; the server rewraps its content key to the current
    data key version without the content key ever leaving the server. ``set`` is there for
    the first file of a sealed set (it is bound into the body digest)."""

    body: BodyHeaderWire
    set: SetBlockWire | None = None
    key: KeyBlockWire
