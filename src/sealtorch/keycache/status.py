"""The key cache's status report (``GET /v1/keycache/status``, ``sealtorch keycache status``).

Only what an operator needs to see: held models, key versions, leases, the last renewal, key
server reachability, denials with reason codes. There is no field that could hold key material:
the schema is closed (``extra="forbid"``) and a test scans every response for key bytes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from sealtorch.protocol import UtcDatetime

__all__ = [
    "AttestationState",
    "AttestationStatus",
    "CacheStatus",
    "DeniedStatus",
    "ExpiredStatus",
    "KeyServerStatus",
    "ModelStatus",
    "PersistenceStatus",
    "State",
]

#: ``ready``: keys held, key server reachable. ``degraded``: serving leased keys while the key
#: server is unreachable. ``denied``: the key server refused this cache (it serves nothing).
#: ``empty``: attested, but no key was released to it. ``unavailable``: no keys and no key
#: server. ``starting``: the first refresh has not finished.
State = Literal["ready", "degraded", "denied", "empty", "unavailable", "starting"]
#: The key server's verdict on the cache's own evidence at the last contact.
AttestationState = Literal["pending", "granted", "denied", "error"]


class _Status(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelStatus(_Status):
    model_id: str
    key_versions: tuple[int, ...]
    lease_expires_at: UtcDatetime
    lease_remaining_seconds: float
    received_at: UtcDatetime
    policy_version: int
    policy_digest: str
    policy_name: str | None = None


class DeniedStatus(_Status):
    model_id: str
    reasons: tuple[str, ...]
    message: str


class ExpiredStatus(_Status):
    model_id: str
    expired_at: UtcDatetime


class KeyServerStatus(_Status):
    url: str
    #: ``None`` until the first contact.
    reachable: bool | None
    last_contact_at: UtcDatetime | None = None
    last_error: str | None = None
    consecutive_failures: int = 0


class AttestationStatus(_Status):
    state: AttestationState
    reasons: tuple[str, ...] = ()
    message: str | None = None
    tee: str
    measurement: str | None = None


class PersistenceStatus(_Status):
    path: str
    restored_keys: int = 0
    last_saved_at: UtcDatetime | None = None
    error: str | None = None


class CacheStatus(_Status):
    state: State
    now: UtcDatetime
    keyserver: KeyServerStatus
    attestation: AttestationStatus
    last_renewal_at: UtcDatetime | None = None
    last_attempt_at: UtcDatetime | None = None
    next_refresh_at: UtcDatetime | None = None
    session_expires_at: UtcDatetime | None = None
    refresh_interval_seconds: float
    models: tuple[ModelStatus, ...] = ()
    denied: tuple[DeniedStatus, ...] = ()
    expired: tuple[ExpiredStatus, ...] = ()
    persistence: PersistenceStatus | None = None
    #: Whether simulated-TEE evidence of local enclaves is trusted (development only).
    simulated_tee: bool = False
