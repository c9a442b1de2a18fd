"""What the key server's two services share: their error, the audit context of a request, the
policy cache, the clock, and how storage failures become ``503`` refusals.

The release service (:mod:`sealtorch.keyserver.release_service`) and the admin service
(:mod:`sealtorch.keyserver.admin_service`) know nothing about HTTP; the routes translate
requests into their calls and :class:`ServiceError` into responses.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from sealtorch.attestation import Policy
from sealtorch.errors import (
    AuditError,
    ConfigError,
    ErrorKind,
    RequestError,
    StorageCorruptError,
    StorageError,
    StorageFullError,
)
from sealtorch.keyserver.records import PolicyRecord
from sealtorch.protocol._wire import rfc3339  # re-exported: one formatter for every time
from sealtorch.protocol.admin import ADMIN_SCOPES, AdminScope
from sealtorch.protocol.audit import AuditEntry, AuditKind

__all__ = [
    "Actor",
    "AuditContext",
    "Clock",
    "ErrorKind",
    "Offload",
    "PolicyCache",
    "ServiceError",
    "not_found_model",
    "rfc3339",
    "scope_list",
    "unavailable",
]

_log = logging.getLogger("sealtorch.keyserver.service")

_POLICY_CACHE_SIZE = 512

_T = TypeVar("_T")


class ServiceError(RequestError):
    """A request the service refuses or cannot serve; ``code`` is stable (``docs/protocol.md``).

    ``kind`` is an :class:`ErrorKind` (the routes map it to an HTTP status).
    """


@dataclass(frozen=True)
class Actor:
    """Who calls an admin operation (an authenticated admin token) and from where, with what
    that token may do (no scopes: nothing) and when it expires."""

    token_id: str
    client_address: str | None = None
    name: str = ""
    scopes: frozenset[AdminScope] = frozenset()
    expires_at: datetime | None = None


@dataclass(slots=True)
class AuditContext:
    """What every audit record of one release or renew request says about the request: who
    asked (``actor``: a session token for a renewal), from where, which request, on what
    evidence and claims (set once verified), for which models."""

    action: str
    request_id: str
    client_address: str | None
    evidence_digest: str | None
    model_ids: tuple[str, ...]
    actor: str | None = None
    claims: dict[str, Any] | None = None
    kind: AuditKind = AuditKind.RELEASE

    def entry(
        self,
        decision: str,
        *,
        reasons: tuple[str, ...] | list[str] = (),
        model_ids: tuple[str, ...] | None = None,
        details: dict[str, Any] | None = None,
    ) -> AuditEntry:
        """The audit record of this request with ``decision``."""
        return AuditEntry(
            kind=self.kind,
            action=self.action,
            decision=decision,
            actor=self.actor,
            client_address=self.client_address,
            request_id=self.request_id,
            evidence_digest=self.evidence_digest,
            claims=self.claims,
            model_ids=self.model_ids if model_ids is None else model_ids,
            reasons=reasons,
            details=details,
        )


class Offload(Protocol):
    """Runs blocking work off the event loop: ``await offload(function, *args, **kwargs)``."""

    def __call__(
        self, function: Callable[..., _T], /, *args: Any, **kwargs: Any
    ) -> Awaitable[_T]: ...


class Clock:
    """The service clock: timezone-aware UTC times (``ConfigError`` for a naive clock)."""

    __slots__ = ("_clock",)

    def __init__(self, clock: Callable[[], datetime] | None = None) -> None:
        self._clock = clock or _system_clock

    def now(self) -> datetime:
        value = self._clock()
        if value.tzinfo is None:
            raise ConfigError("the key server clock must return timezone-aware times")
        return value.astimezone(UTC)


def _system_clock() -> datetime:
    return datetime.now(UTC)


class PolicyCache:
    """Parsed policies by digest (bounded; thread-safe): a stored policy is parsed once."""

    __slots__ = ("_lock", "_policies")

    def __init__(self) -> None:
        self._policies: dict[str, Policy] = {}
        self._lock = threading.Lock()

    def get(self, record: PolicyRecord) -> Policy:
        """The policy of ``record``; :class:`ConfigError` if its stored document is invalid."""
        cached = self._policies.get(record.digest)
        if cached is not None:
            return cached
        policy = Policy.from_json(record.document, source=f"policy v{record.version}")
        with self._lock:
            if len(self._policies) >= _POLICY_CACHE_SIZE:
                self._policies.clear()
            self._policies[record.digest] = policy
        return policy


def unavailable(exc: StorageError) -> ServiceError:
    """The refusal a storage failure becomes: 503 ``audit_unavailable``, ``store_corrupt`` (not
    retryable: the operator restores a backup), ``store_full`` or ``store_unavailable``."""
    if isinstance(exc, StorageCorruptError):
        _log.error("key store failure: %s", exc)
        return ServiceError(
            ErrorKind.UNAVAILABLE,
            "store_corrupt",
            "the key store is damaged, so nothing was released or changed; retrying does not "
            "help: the operator must restore it from a backup",
        )
    if isinstance(exc, StorageFullError):
        _log.error("key store failure: %s", exc)
        return ServiceError(
            ErrorKind.UNAVAILABLE,
            "store_full",
            "the key store's disk is full, so nothing was released or changed; retry once the "
            "operator has freed space",
        )
    if isinstance(exc, AuditError):
        return ServiceError(
            ErrorKind.UNAVAILABLE,
            "audit_unavailable",
            "the audit record could not be written, so nothing was released or changed; "
            "retry later",
        )
    _log.error("key store failure: %s", exc)
    return ServiceError(
        ErrorKind.UNAVAILABLE,
        "store_unavailable",
        "the key store is unavailable; retry later",
    )


def not_found_model(model_id: str) -> ServiceError:
    return ServiceError(ErrorKind.NOT_FOUND, "unknown_model", f"model {model_id!r} does not exist")


def scope_list(scopes: frozenset[AdminScope]) -> list[str]:
    """Scope names in documented order."""
    return [scope.value for scope in ADMIN_SCOPES if scope in scopes]
