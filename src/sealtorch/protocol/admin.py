"""Wire schemas of the key server's admin API (``docs/keyserver.md``).

Like the release protocol's schemas, these are the only admin types that cross the network: the
service builds them from store records, which never reach a response directly. Requests forbid
unknown fields. Binary values are base64url without padding; times are RFC 3339 UTC.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from sealtorch.protocol._wire import B64Bytes, ModelId, UtcDatetime, WireModel

__all__ = [
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
]

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
    #: Lifetime in seconds; ``None`` never expires (revoke it when no longer needed).
    expires_in: Annotated[int, Field(ge=60, le=10 * 365 * 86400)] | None = None


class TokenInfo(WireModel):
    token_id: str
    name: str
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


class RewrapRequest(WireModel):
    """A sealed file's public header; the server rewraps its content key to the current
    data key version without the content key ever leaving the server."""

    body: BodyHeaderWire
    key: KeyBlockWire
