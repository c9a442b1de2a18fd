"""The audit log: an append-only hash chain of every release decision and admin action.

Each :class:`AuditRecord` carries a sequence number (1, 2, 3, ... without gaps), the server time,
what happened, and ``prev_hash`` — the ``hash`` of the record before it (``GENESIS_HASH`` for the
first). Its own ``hash`` is SHA-256 over a canonical, length-prefixed encoding of *every* field
plus ``prev_hash`` (see :func:`record_hash`). The store keeps the newest ``(seq, hash)`` in a
separate head row that it updates in the same transaction as each append.

:func:`verify_chain` recomputes everything and reports the first bad sequence number when a
record was edited (hash mismatch), deleted (sequence gap, or a missing tail against the head),
inserted or reordered (sequence or ``prev_hash`` mismatch).

What a hash chain cannot do on its own: someone with write access to the database can rewrite
the *whole* chain from some record on, consistently. Detecting that needs an anchor kept
elsewhere — export the log (or just the head hash) regularly and pass the last known
``(seq, hash)`` as ``anchor``/``expected_head`` when verifying.

Appending is the store's job (``StoreTransaction.append_audit``): it serialises appenders across
processes and writes the record in the same transaction as the state change it describes, so a
change and its record commit together or not at all (fail closed).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import IO, Any, Protocol

from sealtorch.errors import AuditError

__all__ = [
    "GENESIS_HASH",
    "AuditChainError",
    "AuditEntry",
    "AuditHead",
    "AuditKind",
    "AuditRecord",
    "AuditSource",
    "ChainSummary",
    "build_record",
    "canonical_json",
    "export_jsonl",
    "read_jsonl",
    "record_hash",
    "verify_chain",
    "verify_log",
]

GENESIS_HASH = "0" * 64
_HASH_TAG = b"sealtorch/v1/audit-record\x00"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_WORD = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_MAX_TEXT = 512


class AuditKind(StrEnum):
    RELEASE = "release"
    ADMIN = "admin"


def canonical_json(value: Any) -> str:
    """Canonical JSON text: sorted keys, no whitespace, UTF-8 characters kept, no NaN/Infinity.

    Raises ``TypeError`` for values that are not plain JSON (bytes, datetimes, objects...):
    convert them (hex, RFC 3339) before auditing.
    """
    return _CANONICAL.encode(value)


# What json.dumps builds on every call with these options, built once (the release path
# canonicalises several values per release).
_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


def _to_micros(at: datetime) -> int:
    if at.tzinfo is None:
        raise ValueError("audit times must be timezone-aware")
    delta = at.astimezone(UTC) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _from_micros(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


def _check_word(name: str, value: str) -> str:
    if not _WORD.fullmatch(value):
        raise ValueError(f"audit {name} must match {_WORD.pattern}, not {str(value)[:80]!r}")
    return value


def _check_text(name: str, value: str | None) -> str | None:
    if value is None:
        return None
    if len(value) > _MAX_TEXT or "\x00" in value:
        raise ValueError(f"audit {name} must be a string of at most {_MAX_TEXT} characters")
    return value


@dataclass(frozen=True)
class AuditEntry:
    """What the caller records; the store adds sequence number, time and hashes.

    ``kind``: ``release`` (key release / renewal decisions) or ``admin`` (admin actions).
    ``action``: what was attempted, e.g. ``release``, ``renew``, ``model.create``,
    ``key.rotate``, ``key.revoke``, ``policy.set``, ``token.create``.
    ``decision``: e.g. ``allow``, ``deny``, ``partial`` (some models allowed), ``ok``, ``error``.
    ``actor``: who — an admin token id, a session token id.
    ``evidence_digest``: SHA-256 (hex) of the evidence bytes (never the evidence itself).
    ``claims`` and ``details``: JSON objects (plain JSON values only).
    ``reasons``: stable reason codes (``measurement_mismatch``...).
    """

    kind: AuditKind
    action: str
    decision: str
    actor: str | None = None
    client_address: str | None = None
    request_id: str | None = None
    evidence_digest: str | None = None
    claims: Mapping[str, Any] | None = None
    model_ids: Sequence[str] = ()
    reasons: Sequence[str] = ()
    details: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.kind not in tuple(AuditKind):
            raise ValueError(f"audit kind must be 'release' or 'admin', not {self.kind!r}")
        object.__setattr__(self, "kind", AuditKind(self.kind))
        _check_word("action", self.action)
        _check_word("decision", self.decision)
        for name in ("actor", "client_address", "request_id"):
            _check_text(name, getattr(self, name))
        if self.evidence_digest is not None and not re.fullmatch(
            r"[0-9a-f]{32,128}", self.evidence_digest
        ):
            raise ValueError("evidence_digest must be a lowercase hex digest")
        if isinstance(self.model_ids, str) or isinstance(self.reasons, str):
            raise TypeError("model_ids and reasons are sequences of strings, not one string")
        object.__setattr__(self, "model_ids", tuple(self.model_ids))
        object.__setattr__(self, "reasons", tuple(self.reasons))
        for item in (*self.model_ids, *self.reasons):
            _check_text("model id / reason", item)
        for name in ("claims", "details"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Mapping):
                raise TypeError(f"audit {name} must be a JSON object (a mapping)")

    def encoded(self) -> dict[str, str | None]:
        """The JSON text columns, canonicalised (``TypeError``/``ValueError`` if not JSON)."""
        return {
            "claims": None if self.claims is None else canonical_json(dict(self.claims)),
            "model_ids": canonical_json(list(self.model_ids)),
            "reasons": canonical_json(list(self.reasons)),
            "details": None if self.details is None else canonical_json(dict(self.details)),
        }


@dataclass(frozen=True)
class AuditRecord:
    """A stored audit record. JSON fields are kept as their canonical text (what is hashed)."""

    seq: int
    at: datetime
    kind: str
    action: str
    decision: str
    actor: str | None
    client_address: str | None
    request_id: str | None
    evidence_digest: str | None
    claims_json: str | None
    model_ids_json: str
    reasons_json: str
    details_json: str | None
    prev_hash: str
    hash: str

    @property
    def at_micros(self) -> int:
        return _to_micros(self.at)

    @property
    def claims(self) -> dict[str, Any] | None:
        return None if self.claims_json is None else json.loads(self.claims_json)

    @property
    def details(self) -> dict[str, Any] | None:
        return None if self.details_json is None else json.loads(self.details_json)

    @property
    def model_ids(self) -> tuple[str, ...]:
        return tuple(json.loads(self.model_ids_json))

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(json.loads(self.reasons_json))

    def computed_hash(self) -> str:
        return record_hash(
            seq=self.seq,
            at_micros=self.at_micros,
            kind=self.kind,
            action=self.action,
            decision=self.decision,
            actor=self.actor,
            client_address=self.client_address,
            request_id=self.request_id,
            evidence_digest=self.evidence_digest,
            claims_json=self.claims_json,
            model_ids_json=self.model_ids_json,
            reasons_json=self.reasons_json,
            details_json=self.details_json,
            prev_hash=self.prev_hash,
        )

    def as_json(self) -> dict[str, Any]:
        """The export form (one JSON Lines object)."""
        return {
            "seq": self.seq,
            "time": self.at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "kind": self.kind,
            "action": self.action,
            "decision": self.decision,
            "actor": self.actor,
            "client_address": self.client_address,
            "request_id": self.request_id,
            "evidence_digest": self.evidence_digest,
            "claims": self.claims,
            "model_ids": list(self.model_ids),
            "reasons": list(self.reasons),
            "details": self.details,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


def build_record(
    entry: AuditEntry,
    *,
    seq: int,
    at: datetime,
    prev_hash: str,
    encoded: Mapping[str, str | None] | None = None,
) -> AuditRecord:
    """The record for ``entry`` at position ``seq`` after ``prev_hash`` (used by the store).

    ``encoded``: ``entry.encoded()`` computed earlier (a store that batches appends encodes each
    entry when it is submitted, so a malformed one fails alone, not the whole batch).
    """
    if seq < 1:
        raise ValueError("audit sequence numbers start at 1")
    if encoded is None:
        encoded = entry.encoded()
    at = _from_micros(_to_micros(at))  # truncate to what the database stores
    fields: dict[str, Any] = {
        "seq": seq,
        "kind": entry.kind.value,
        "action": entry.action,
        "decision": entry.decision,
        "actor": entry.actor,
        "client_address": entry.client_address,
        "request_id": entry.request_id,
        "evidence_digest": entry.evidence_digest,
        "claims_json": encoded["claims"],
        "model_ids_json": encoded["model_ids"],
        "reasons_json": encoded["reasons"],
        "details_json": encoded["details"],
        "prev_hash": prev_hash,
    }
    # Hashed from the fields directly: no provisional record to build (the release path).
    return AuditRecord(at=at, **fields, hash=record_hash(at_micros=_to_micros(at), **fields))


def _field(value: str | int | None) -> bytes:
    if value is None:
        return b"N"
    if isinstance(value, int):
        return b"I" + value.to_bytes(8, "big", signed=True)
    raw = value.encode("utf-8")
    return b"S" + len(raw).to_bytes(4, "big") + raw


def record_hash(
    *,
    seq: int,
    at_micros: int,
    kind: str,
    action: str,
    decision: str,
    actor: str | None,
    client_address: str | None,
    request_id: str | None,
    evidence_digest: str | None,
    claims_json: str | None,
    model_ids_json: str,
    reasons_json: str,
    details_json: str | None,
    prev_hash: str,
) -> str:
    """SHA-256 (hex) over the domain tag and every field, each type-tagged and length-prefixed.

    Encoding: ``b"sealtorch/v1/audit-record\\0"``, then for each field in the order of the
    parameters: ``N`` for null; ``I`` + 8-byte big-endian signed integer; ``S`` + 4-byte
    big-endian length + UTF-8 bytes. JSON fields are hashed as their canonical text.
    """
    digest = hashlib.sha256(_HASH_TAG)
    for value in (
        seq,
        at_micros,
        kind,
        action,
        decision,
        actor,
        client_address,
        request_id,
        evidence_digest,
        claims_json,
        model_ids_json,
        reasons_json,
        details_json,
        prev_hash,
    ):
        digest.update(_field(value))
    return digest.hexdigest()


@dataclass(frozen=True)
class AuditHead:
    """The newest record's ``(seq, hash)``; ``(0, GENESIS_HASH)`` for an empty log."""

    seq: int
    hash: str


@dataclass(frozen=True)
class ChainSummary:
    """A verified (segment of the) chain."""

    count: int
    first_seq: int | None
    last_seq: int
    last_hash: str


class AuditChainError(AuditError):
    """The audit chain does not verify. ``seq`` is the first bad sequence number."""

    def __init__(self, seq: int, problem: str, message: str) -> None:
        super().__init__(message)
        self.seq = seq
        self.problem = problem


def verify_chain(
    records: Iterable[AuditRecord],
    *,
    head: AuditHead | None = None,
    anchor: AuditHead | None = None,
    expected_head: AuditHead | None = None,
) -> ChainSummary:
    """Verify ``records`` (in sequence order) and return a summary, or raise
    :class:`AuditChainError` naming the first bad sequence number.

    ``anchor``: the ``(seq, hash)`` just before the first record (default: the start of the
    log). ``head``: the store's head row; the last record must match it (a deleted tail is
    found this way). ``expected_head``: a head recorded earlier elsewhere (an export); the
    chain must still contain exactly that record at that position.
    """
    start = anchor or AuditHead(0, GENESIS_HASH)
    expected_seq = start.seq + 1
    prev = start.hash
    count = 0
    first: int | None = None
    seen_expected = expected_head is None or expected_head.seq <= start.seq
    for record in records:
        if record.seq != expected_seq:
            missing = record.seq > expected_seq
            raise AuditChainError(
                expected_seq,
                "missing" if missing else "out_of_order",
                f"audit record {expected_seq} is {'missing' if missing else 'out of order'} "
                f"(found record {record.seq} where {expected_seq} belongs)",
            )
        if record.prev_hash != prev:
            raise AuditChainError(
                record.seq,
                "broken_link",
                f"audit record {record.seq} does not follow record {record.seq - 1} "
                "(previous-hash mismatch): a record was inserted, removed or reordered",
            )
        try:
            computed = record.computed_hash()
        except (ValueError, TypeError, OverflowError) as exc:
            raise AuditChainError(
                record.seq, "malformed", f"audit record {record.seq} is malformed: {exc}"
            ) from exc
        if not _HEX64.fullmatch(record.hash) or computed != record.hash:
            raise AuditChainError(
                record.seq,
                "edited",
                f"audit record {record.seq} was modified after it was written (hash mismatch)",
            )
        if expected_head is not None and record.seq == expected_head.seq:
            if record.hash != expected_head.hash:
                raise AuditChainError(
                    record.seq,
                    "anchor_mismatch",
                    f"audit record {record.seq} differs from the one recorded earlier: the chain "
                    "was rewritten from this point on",
                )
            seen_expected = True
        prev = record.hash
        expected_seq += 1
        count += 1
        if first is None:
            first = record.seq
    last_seq = expected_seq - 1
    if head is not None and (head.seq != last_seq or head.hash != prev):
        if head.seq > last_seq:
            raise AuditChainError(
                last_seq + 1,
                "missing",
                f"audit records {last_seq + 1}..{head.seq} are missing (the log ends early)",
            )
        raise AuditChainError(
            min(head.seq, last_seq) or 1,
            "head_mismatch",
            f"the audit head (record {head.seq}) does not match the last record ({last_seq})",
        )
    if expected_head is not None and not seen_expected:
        raise AuditChainError(
            last_seq + 1,
            "missing",
            f"audit record {expected_head.seq}, recorded earlier, is no longer in the log",
        )
    return ChainSummary(count=count, first_seq=first, last_seq=last_seq, last_hash=prev)


class AuditSource(Protocol):
    """What :func:`verify_log` reads (a ``Store`` is one)."""

    def audit_head(self) -> AuditHead: ...

    def iter_audit(
        self, *, after_seq: int = 0, up_to_seq: int | None = None
    ) -> Iterator[AuditRecord]: ...


def verify_log(source: AuditSource, *, expected_head: AuditHead | None = None) -> ChainSummary:
    """Verify a live audit log (e.g. the store) while other processes may still append.

    Reads the head first, then every record. Records appended during the walk are accepted when
    a fresh head covers them; a record *beyond* the head that no head covers was inserted
    behind the key server's back and is reported.
    """
    head = source.audit_head()
    seen: dict[int, str] = {}

    def tracked() -> Iterator[AuditRecord]:
        for record in source.iter_audit():
            if record.seq == head.seq:
                seen[record.seq] = record.hash
            yield record

    summary = verify_chain(tracked(), expected_head=expected_head)
    if summary.last_seq < head.seq:
        raise AuditChainError(
            summary.last_seq + 1,
            "missing",
            f"audit records {summary.last_seq + 1}..{head.seq} are missing (the log ends early)",
        )
    if head.seq and seen.get(head.seq) != head.hash:
        raise AuditChainError(
            head.seq,
            "head_mismatch",
            f"audit record {head.seq} does not match the audit head: it was replaced",
        )
    if summary.last_seq > head.seq:
        newer = source.audit_head()
        if newer.seq < summary.last_seq or (
            newer.seq == summary.last_seq and newer.hash != summary.last_hash
        ):
            raise AuditChainError(
                head.seq + 1,
                "not_in_head",
                f"audit records after {newer.seq} are not covered by the audit head: they were "
                "inserted outside the key server",
            )
    return summary


def export_jsonl(records: Iterable[AuditRecord], stream: IO[str]) -> int:
    """Write records as JSON Lines (one ASCII object per line, sorted keys); returns how many."""
    count = 0
    for record in records:
        # ASCII-only lines: raw U+2028/U+0085 inside a line would split it for many readers.
        line = json.dumps(
            record.as_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=True
        )
        stream.write(line + "\n")
        count += 1
    return count


_EXPORT_KEYS = frozenset(
    {
        "seq",
        "time",
        "kind",
        "action",
        "decision",
        "actor",
        "client_address",
        "request_id",
        "evidence_digest",
        "claims",
        "model_ids",
        "reasons",
        "details",
        "prev_hash",
        "hash",
    }
)


def _parse_time(text: Any) -> datetime:
    if not isinstance(text, str) or not re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", text
    ):
        raise ValueError("time must be RFC 3339 UTC with microseconds")
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def _optional_json(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be an object or null")
    return canonical_json(value)


def _string_list(value: Any, name: str) -> str:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a list of strings")
    return canonical_json(value)


def _optional_str(value: Any, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} must be a string or null")
    return value


def read_jsonl(lines: Iterable[str]) -> Iterator[AuditRecord]:
    """Parse an export made by :func:`export_jsonl` (strictly) for :func:`verify_chain`."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line, parse_constant=_reject_constant)
            if not isinstance(data, dict) or set(data) != _EXPORT_KEYS:
                raise ValueError("not an audit record object (unexpected or missing fields)")
            seq = data["seq"]
            if not isinstance(seq, int) or isinstance(seq, bool):
                raise ValueError("seq must be an integer")
            for name in ("kind", "action", "decision", "prev_hash", "hash"):
                if not isinstance(data[name], str):
                    raise ValueError(f"{name} must be a string")
            yield AuditRecord(
                seq=seq,
                at=_parse_time(data["time"]),
                kind=data["kind"],
                action=data["action"],
                decision=data["decision"],
                actor=_optional_str(data["actor"], "actor"),
                client_address=_optional_str(data["client_address"], "client_address"),
                request_id=_optional_str(data["request_id"], "request_id"),
                evidence_digest=_optional_str(data["evidence_digest"], "evidence_digest"),
                claims_json=_optional_json(data["claims"], "claims"),
                model_ids_json=_string_list(data["model_ids"], "model_ids"),
                reasons_json=_string_list(data["reasons"], "reasons"),
                details_json=_optional_json(data["details"], "details"),
                prev_hash=data["prev_hash"],
                hash=data["hash"],
            )
        except (ValueError, TypeError) as exc:
            raise AuditError(f"audit export line {number} is not valid: {exc}") from exc


def _reject_constant(name: str) -> float:
    del name
    raise ValueError("NaN and Infinity are not valid in an audit export")
