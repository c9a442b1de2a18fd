"""Wire schemas of the key release protocol (``docs/protocol.md``), shared by server, cache, client.

These are the only types that cross the network. Database rows and service objects are separate
types, so a secret column can never leak into a response by accident. Every model forbids unknown
fields: a typo in a request is an error, never a silently ignored option.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    field_validator,
)

__all__ = [
    "API_PREFIX",
    "DEFAULT_HPKE_SUITE",
    "HPKE_SUITES",
    "HPKE_SUITE_MLKEM768_X25519",
    "HPKE_SUITE_X25519",
    "MAX_RELEASE_BODY",
    "MODEL_ID_PATTERN",
    "ChallengeResponse",
    "DeniedModel",
    "ErrorBody",
    "ErrorDetail",
    "EvidenceWire",
    "GrantedKey",
    "HpkeKey",
    "ReleaseRequest",
    "ReleaseResponse",
    "RenewRequest",
    "SessionGrant",
    "b64decode",
    "b64encode",
    "key_release_info",
    "utc_now",
]

API_PREFIX = "/v1"

HPKE_SUITE_X25519 = "DHKEM(X25519,HKDF-SHA256)/HKDF-SHA256/AES-256-GCM"
HPKE_SUITE_MLKEM768_X25519 = "MLKEM768-X25519/HKDF-SHA256/AES-256-GCM"
HPKE_SUITES = (HPKE_SUITE_X25519, HPKE_SUITE_MLKEM768_X25519)
DEFAULT_HPKE_SUITE = HPKE_SUITE_X25519

#: Largest accepted release request body (evidence included), in bytes.
MAX_RELEASE_BODY = 64 * 1024
#: Model ids: letters, digits, '.', '_' and '-'; start with a letter or digit; at most 128.
MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_MODEL_ID = re.compile(MODEL_ID_PATTERN)

_KEY_RELEASE_INFO_TAG = b"sealtorch/v1/key-release\x00"


def b64encode(data: bytes) -> str:
    """base64url without padding (the protocol's encoding of binary values)."""
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def b64decode(text: str) -> bytes:
    """Strict inverse of :func:`b64encode`; raises ``ValueError`` on anything else."""
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("must be base64url without padding")
    if len(text) % 4 == 1:
        raise ValueError("is not valid base64url (impossible length)")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("is not valid base64url") from exc
    if b64encode(data) != text:
        raise ValueError("is not canonical base64url")
    return data


def _decode_b64(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise ValueError("must be a base64url string")  # pydantic reports ValueError only
    return b64decode(value)


B64Bytes = Annotated[
    bytes,
    BeforeValidator(_decode_b64),
    PlainSerializer(b64encode, return_type=str, when_used="json"),
]


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("times must carry a timezone (UTC, 'Z')")
    return value.astimezone(UTC)


UtcDatetime = Annotated[
    datetime,
    AfterValidator(_utc),
    PlainSerializer(
        lambda v: v.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        return_type=str,
        when_used="json",
    ),
]

ModelId = Annotated[str, Field(pattern=MODEL_ID_PATTERN, max_length=128)]


def utc_now() -> datetime:
    return datetime.now(UTC)


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_max_length=65536)


class ChallengeResponse(_Wire):
    nonce: B64Bytes
    expires_at: UtcDatetime
    hpke_suites: tuple[str, ...]
    evidence_types: tuple[str, ...]


class EvidenceWire(_Wire):
    type: Literal["sgx-dcap", "tdx-dcap", "sim"]
    data: Annotated[B64Bytes, Field(min_length=1, max_length=48 * 1024)]


class HpkeKey(_Wire):
    suite: Literal[
        "DHKEM(X25519,HKDF-SHA256)/HKDF-SHA256/AES-256-GCM",
        "MLKEM768-X25519/HKDF-SHA256/AES-256-GCM",
    ]
    public_key: Annotated[B64Bytes, Field(min_length=32, max_length=1216)]


class ReleaseRequest(_Wire):
    nonce: Annotated[B64Bytes, Field(min_length=16, max_length=64)]
    evidence: EvidenceWire
    hpke: HpkeKey
    #: Model ids to release; ``None`` asks for every model the evidence may receive.
    models: Annotated[tuple[ModelId, ...], Field(max_length=1024)] | None = None
    #: Ask for a renewal session token.
    session: bool = False

    @field_validator("models")
    @classmethod
    def _unique(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("model ids must not repeat")
        return value


class RenewRequest(_Wire):
    #: Fresh client randomness, bound into every sealed key of the response (anti-replay: a
    #: renewal reuses the public key of the original evidence).
    nonce: Annotated[B64Bytes, Field(min_length=16, max_length=64)]
    models: Annotated[tuple[ModelId, ...], Field(max_length=1024)] | None = None


class GrantedKey(_Wire):
    model_id: ModelId
    key_version: Annotated[int, Field(ge=1)]
    #: HPKE ``enc ‖ ciphertext`` of the 32-byte data key.
    sealed_key: Annotated[B64Bytes, Field(min_length=48, max_length=4096)]
    lease_expires_at: UtcDatetime
    policy: dict[str, Any]
    policy_version: Annotated[int, Field(ge=1)]
    #: SHA-256 (hex) of the policy's canonical JSON; bound into the HPKE ``info``.
    policy_digest: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class DeniedModel(_Wire):
    model_id: ModelId
    reasons: tuple[str, ...]
    message: str


class SessionGrant(_Wire):
    token: Annotated[str, Field(min_length=16, max_length=256)]
    expires_at: UtcDatetime


class ReleaseResponse(_Wire):
    request_id: str
    server_time: UtcDatetime
    granted: tuple[GrantedKey, ...]
    denied: tuple[DeniedModel, ...]
    session: SessionGrant | None = None


class ErrorDetail(_Wire):
    code: str
    message: str
    reasons: tuple[str, ...] = ()


class ErrorBody(_Wire):
    error: ErrorDetail


def key_release_info(
    *,
    model_id: str,
    key_version: int,
    request_id: str,
    request_nonce: bytes,
    policy_digest: str,
    lease_expires_at: datetime,
) -> bytes:
    """HPKE ``info`` for one released key.

    Binds the key to its model and version, to the response it belongs to (request id and the
    request's nonce: the challenge nonce on release, the client's fresh nonce on renewal), to the
    policy that governs it (a man in the middle cannot swap in a weaker policy for the key cache
    to enforce) and to its lease (it cannot be extended in transit). HPKE itself binds the suite
    and the recipient's public key.
    """
    if not _MODEL_ID.fullmatch(model_id):
        raise ValueError(f"invalid model id {model_id!r}")
    if key_version < 1:
        raise ValueError("key versions start at 1")
    if not re.fullmatch(r"[0-9a-f]{64}", policy_digest):
        raise ValueError("policy_digest must be 64 lowercase hex digits (SHA-256)")
    body = json.dumps(
        {
            "key_version": key_version,
            "lease_expires_at": _utc(lease_expires_at).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "model_id": model_id,
            "policy_digest": policy_digest,
            "request_id": request_id,
            "request_nonce": b64encode(request_nonce),
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    ).encode("ascii")
    return _KEY_RELEASE_INFO_TAG + body
