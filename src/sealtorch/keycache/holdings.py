"""What the key cache holds: leased data keys with their policies, in memory only.

A :class:`Holdings` is an immutable snapshot; the cache replaces it as a whole after every
refresh (so a key the key server no longer releases — revoked, or its policy now refuses this
cache — disappears at once) and when leases end. Readers never lock: they take the current
snapshot and work with it.

Times are on the cache's clock. A lease the key server granted is converted when it arrives:
``expires_at = received_at + (lease_expires_at - server_time)``, so the cache never depends on
its clock agreeing with the key server's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any

from sealtorch.attestation import Policy
from sealtorch.keys import DataKey
from sealtorch.protocol import SignedStatement

__all__ = [
    "MODEL_LEVEL_REASONS",
    "HeldKey",
    "Holdings",
    "Refusal",
    "ServerDenial",
    "lease_end_local",
]

#: Denial reasons that describe the *model* (not the cache's evidence): a local client asking
#: for such a model gets the same code the key server gave.
MODEL_LEVEL_REASONS = frozenset({"unknown_model", "no_active_key", "no_policy", "policy_invalid"})


@dataclass(frozen=True, slots=True)
class HeldKey:
    """One data key version the cache holds, with its lease, its governing policy and the key
    server's signed release statement about it (forwarded to local clients with the key)."""

    model_id: str
    key_version: int
    key: DataKey = field(repr=False)
    #: When the lease ends, on the cache's clock.
    expires_at: datetime
    #: When the cache received it, on the cache's clock.
    received_at: datetime
    policy: Policy = field(repr=False)
    #: The policy document exactly as the key server sent it (returned to local clients).
    policy_document: Mapping[str, Any] = field(repr=False)
    policy_version: int
    policy_digest: str
    statement: SignedStatement = field(repr=False)

    def renew_due(self, fraction: float) -> datetime:
        """When this lease should be renewed: ``fraction`` of it has passed."""
        return self.received_at + (self.expires_at - self.received_at) * fraction


@dataclass(frozen=True, slots=True)
class Refusal:
    """The key server refused this cache's own release request (its evidence, typically)."""

    code: str
    reasons: tuple[str, ...]
    message: str


@dataclass(frozen=True, slots=True)
class ServerDenial:
    """The key server's refusal of one model to this cache."""

    model_id: str
    reasons: tuple[str, ...]
    message: str


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True)
class Holdings:
    """An immutable snapshot of everything the cache holds (see the module docstring)."""

    #: model id -> key versions held, newest first.
    keys: Mapping[str, tuple[HeldKey, ...]] = field(default_factory=_empty)
    #: model id -> the key server's denial of that model to this cache.
    denied: Mapping[str, ServerDenial] = field(default_factory=_empty)
    #: model id -> when its lease ended (its keys were dropped then).
    expired: Mapping[str, datetime] = field(default_factory=_empty)
    #: Set when the key server refused this cache's own attestation: it then holds nothing.
    refusal: Refusal | None = None

    @classmethod
    def build(
        cls,
        keys: Iterable[HeldKey],
        *,
        denied: Iterable[ServerDenial] = (),
        expired: Mapping[str, datetime] | None = None,
        refusal: Refusal | None = None,
    ) -> Holdings:
        grouped: dict[str, list[HeldKey]] = {}
        for held in keys:
            grouped.setdefault(held.model_id, []).append(held)
        frozen = {
            model: tuple(sorted(versions, key=lambda k: k.key_version, reverse=True))
            for model, versions in grouped.items()
        }
        return cls(
            keys=MappingProxyType(frozen),
            denied=MappingProxyType({d.model_id: d for d in denied if d.model_id not in frozen}),
            expired=MappingProxyType({m: t for m, t in (expired or {}).items() if m not in frozen}),
            refusal=refusal,
        )

    def __repr__(self) -> str:
        return (
            f"Holdings({len(self.keys)} models, {self.key_count} keys, "
            f"{len(self.denied)} denied, {len(self.expired)} expired)"
        )

    @property
    def key_count(self) -> int:
        return sum(len(versions) for versions in self.keys.values())

    def valid(self, model_id: str, now: datetime) -> tuple[HeldKey, ...]:
        """The versions of ``model_id`` whose leases are still running at ``now``."""
        return tuple(k for k in self.keys.get(model_id, ()) if now < k.expires_at)

    def next_expiry(self) -> datetime | None:
        ends = [k.expires_at for versions in self.keys.values() for k in versions]
        return min(ends) if ends else None

    def next_renewal(self, fraction: float) -> datetime | None:
        dues = [k.renew_due(fraction) for versions in self.keys.values() for k in versions]
        return min(dues) if dues else None

    def without_expired(self, now: datetime) -> Holdings:
        """This snapshot with every ended lease dropped (and its key object released)."""
        kept: list[HeldKey] = []
        expired = dict(self.expired)
        changed = False
        for model_id, versions in self.keys.items():
            live = [k for k in versions if now < k.expires_at]
            if len(live) != len(versions):
                changed = True
            if live:
                kept.extend(live)
            else:
                expired[model_id] = max(k.expires_at for k in versions)
        if not changed:
            return self
        return Holdings.build(
            kept, denied=self.denied.values(), expired=expired, refusal=self.refusal
        )


def lease_end_local(
    *, lease_expires_at: datetime, server_time: datetime, received_at: datetime
) -> datetime:
    """A key server lease converted to the cache's clock (never longer than granted)."""
    remaining = lease_expires_at - server_time
    return received_at + max(remaining, timedelta(0))
