"""Wire schemas of the key release protocol (``docs/protocol.md``), shared by server, cache, client.

These are the only types that cross the network. Database rows and service objects are separate
types, so a secret column can never leak into a response by accident. Every model forbids unknown
fields: a typo in a request is an error, never a silently ignored option.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from sealtorch.protocol._wire import (
    MODEL_ID_PATTERN,
    MODEL_ID_RE,
    B64Bytes,
    ModelId,
    UtcDatetime,
    WireModel,
    as_utc,
    b64decode,
    b64encode,
    rfc3339,
    utc_now,
)
from sealtorch.protocol.statement import SignedStatement

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
_KEY_RELEASE_INFO_TAG = b"sealtorch/v1/key-release\x00"


class ChallengeResponse(WireModel):
    nonce: B64Bytes
    expires_at: UtcDatetime
    hpke_suites: tuple[str, ...]
    evidence_types: tuple[str, ...]


class EvidenceWire(WireModel):
    type: Literal["sgx-dcap", "tdx-dcap", "sev-snp", "sim"]
    data: Annotated[B64Bytes, Field(min_length=1, max_length=48 * 1024)]


class HpkeKey(WireModel):
    suite: Literal[
        "DHKEM(X25519,HKDF-SHA256)/HKDF-SHA256/AES-256-GCM",
        "MLKEM768-X25519/HKDF-SHA256/AES-256-GCM",
    ]
    public_key: Annotated[B64Bytes, Field(min_length=32, max_length=1216)]


class ReleaseRequest(WireModel):
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


class RenewRequest(WireModel):
    #: Fresh client randomness, bound into every sealed key of the response (anti-replay: a
    #: renewal reuses the public key of the original evidence).
    nonce: Annotated[B64Bytes, Field(min_length=16, max_length=64)]
    models: Annotated[tuple[ModelId, ...], Field(max_length=1024)] | None = None


class GrantedKey(WireModel):
    model_id: ModelId
    key_version: Annotated[int, Field(ge=1)]
    #: HPKE ``enc ‖ ciphertext`` of the 32-byte data key.
    sealed_key: Annotated[B64Bytes, Field(min_length=48, max_length=4096)]
    lease_expires_at: UtcDatetime
    policy: dict[str, Any]
    policy_version: Annotated[int, Field(ge=1)]
    #: SHA-256 (hex) of the policy's canonical JSON; bound into the HPKE ``info``.
    policy_digest: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    #: The key server's signed release statement for this key (``statement.py``); a key
    #: cache forwards the one it received. Optional on the wire only so that a client can
    #: refuse its absence with a reason code (``statement_missing``): it is never optional.
    statement: SignedStatement | None = None


class DeniedModel(WireModel):
    model_id: ModelId
    reasons: tuple[str, ...]
    message: str


class SessionGrant(WireModel):
    token: Annotated[str, Field(min_length=16, max_length=256)]
    expires_at: UtcDatetime


class ReleaseResponse(WireModel):
    request_id: str
    server_time: UtcDatetime
    granted: tuple[GrantedKey, ...]
    denied: tuple[DeniedModel, ...]
    session: SessionGrant | None = None


class ErrorDetail(WireModel):
    code: str
    message: str
    reasons: tuple[str, ...] = ()


class ErrorBody(WireModel):
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
    if not MODEL_ID_RE.fullmatch(model_id):
        raise ValueError(f"invalid model id {model_id!r}")
    if key_version < 1:
        raise ValueError("key versions start at 1")
    if not _HEX64.fullmatch(policy_digest):
        raise ValueError("policy_digest must be 64 lowercase hex digits (SHA-256)")
    body = _INFO_ENCODER.encode(
        {
            "key_version": key_version,
            "lease_expires_at": rfc3339(as_utc(lease_expires_at)),
            "model_id": model_id,
            "policy_digest": policy_digest,
            "request_id": request_id,
            "request_nonce": b64encode(request_nonce),
        }
    ).encode("ascii")
    return _KEY_RELEASE_INFO_TAG + body


# Built once, not per call as json.dumps does with these options (the release path, both ends).
_INFO_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)
_HEX64 = re.compile(r"[0-9a-f]{64}")
