"""Audit chain: canonical hashing, verification of every kind of tampering, JSON Lines export."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sealtorch.errors import AuditError
from sealtorch.protocol.audit import (
    GENESIS_HASH,
    AuditChainError,
    AuditEntry,
    AuditHead,
    AuditKind,
    AuditRecord,
    build_record,
    canonical_json,
    export_jsonl,
    read_jsonl,
    verify_chain,
)

T0 = datetime(2030, 5, 6, 7, 8, 9, 654321, tzinfo=UTC)


def _entry(n: int) -> AuditEntry:
    if n % 2:
        return AuditEntry(
            kind=AuditKind.RELEASE,
            action="release",
            decision="partial",
            actor=None,
            client_address=f"10.0.0.{n}",
            request_id=f"req-{n}",
            evidence_digest="ab" * 32,
            claims={"tee": "sgx", "mrenclave": "cd" * 32, "isvsvn": n, "debug": False},
            model_ids=["resnet50", "bert"],
            reasons=["measurement_mismatch"],
        )
    return AuditEntry(
        kind=AuditKind.ADMIN,
        action="model.create",
        decision="ok",
        actor="0123456789abcdef",
        details={"model_id": f"m{n}", "key_version": 1, "note": "ünïcode ✓"},
        model_ids=[f"m{n}"],
    )


def _chain(length: int) -> list[AuditRecord]:
    records: list[AuditRecord] = []
    prev = GENESIS_HASH
    for n in range(1, length + 1):
        record = build_record(_entry(n), seq=n, at=T0 + timedelta(seconds=n), prev_hash=prev)
        records.append(record)
        prev = record.hash
    return records


def _head(records: list[AuditRecord]) -> AuditHead:
    return AuditHead(records[-1].seq, records[-1].hash) if records else AuditHead(0, GENESIS_HASH)


def test_valid_chain_verifies() -> None:
    records = _chain(6)
    summary = verify_chain(records, head=_head(records))
    assert (summary.count, summary.first_seq, summary.last_seq) == (6, 1, 6)
    assert summary.last_hash == records[-1].hash
    assert records[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(records))


def test_empty_chain_verifies() -> None:
    summary = verify_chain([], head=AuditHead(0, GENESIS_HASH))
    assert summary.count == 0
    assert summary.last_hash == GENESIS_HASH


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("decision", "allow"),
        ("reasons_json", "[]"),
        ("claims_json", canonical_json({"tee": "sgx", "debug": True})),
        ("client_address", "192.0.2.1"),
        ("model_ids_json", '["resnet50"]'),
        ("at", T0),
        ("actor", "ffffffffffffffff"),
        ("details_json", None),
        ("evidence_digest", None),
    ],
)
def test_any_edited_field_is_found(field: str, value: object) -> None:
    records = _chain(5)
    target = 3 if field not in {"actor", "details_json"} else 2
    records[target - 1] = dataclasses.replace(records[target - 1], **{field: value})
    with pytest.raises(AuditChainError) as info:
        verify_chain(records, head=_head(records))
    assert info.value.seq == target
    assert info.value.problem == "edited"


def test_edited_record_with_recomputed_hash_breaks_the_next_link() -> None:
    records = _chain(5)
    forged = dataclasses.replace(records[2], decision="allow", reasons_json="[]")
    records[2] = dataclasses.replace(forged, hash=forged.computed_hash())
    with pytest.raises(AuditChainError) as info:
        verify_chain(records, head=_head(records))
    assert (info.value.seq, info.value.problem) == (4, "broken_link")


def test_deleted_record_is_found() -> None:
    records = _chain(5)
    del records[1]
    with pytest.raises(AuditChainError) as info:
        verify_chain(records, head=_head(records))
    assert (info.value.seq, info.value.problem) == (2, "missing")


def test_deleted_tail_is_found_against_the_head() -> None:
    records = _chain(5)
    head = _head(records)
    with pytest.raises(AuditChainError, match=r"records 4\.\.5 are missing") as info:
        verify_chain(records[:3], head=head)
    assert info.value.seq == 4


def test_reordered_records_are_found() -> None:
    records = _chain(5)
    records[1], records[2] = records[2], records[1]
    with pytest.raises(AuditChainError) as info:
        verify_chain(records, head=_head(records))
    assert info.value.seq == 2
    assert info.value.problem in {"missing", "out_of_order"}


def test_swapped_contents_keeping_sequence_numbers_are_found() -> None:
    """Swap everything but ``seq`` between rows 2 and 4 (an UPDATE-based reorder)."""
    records = _chain(5)
    two, four = records[1], records[3]
    records[1] = dataclasses.replace(four, seq=2)
    records[3] = dataclasses.replace(two, seq=4)
    with pytest.raises(AuditChainError) as info:
        verify_chain(records, head=_head(records))
    assert info.value.seq == 2


def test_inserted_record_is_found() -> None:
    records = _chain(4)
    intruder = build_record(_entry(9), seq=3, at=T0, prev_hash=records[1].hash)
    tampered = [
        *records[:2],
        intruder,
        *[dataclasses.replace(r, seq=r.seq + 1) for r in records[2:]],
    ]
    with pytest.raises(AuditChainError) as info:
        verify_chain(tampered, head=_head(tampered))
    assert info.value.seq == 4


def test_duplicate_record_is_found() -> None:
    records = _chain(3)
    with pytest.raises(AuditChainError) as info:
        verify_chain([records[0], records[1], records[1], records[2]])
    assert (info.value.seq, info.value.problem) == (3, "out_of_order")


def test_rewritten_chain_is_found_with_an_external_anchor() -> None:
    """Someone rewrites the whole chain from record 3 on, consistently. Only an anchor kept
    elsewhere (an earlier export's head) can tell."""
    records = _chain(5)
    anchor = AuditHead(4, records[3].hash)
    rewritten = records[:2]
    prev = records[1].hash
    for n in range(3, 6):
        entry = dataclasses.replace(_entry(n), decision="deny") if n == 3 else _entry(n)
        record = build_record(entry, seq=n, at=T0 + timedelta(seconds=n), prev_hash=prev)
        rewritten.append(record)
        prev = record.hash
    verify_chain(rewritten, head=_head(rewritten))  # internally consistent...
    with pytest.raises(AuditChainError) as info:  # ...but not what was exported earlier
        verify_chain(rewritten, head=_head(rewritten), expected_head=anchor)
    assert (info.value.seq, info.value.problem) == (4, "anchor_mismatch")
    with pytest.raises(AuditChainError, match="no longer in the log"):
        verify_chain(rewritten[:3], expected_head=anchor)


def test_segment_after_an_anchor_verifies() -> None:
    records = _chain(6)
    anchor = AuditHead(3, records[2].hash)
    assert verify_chain(records[3:], anchor=anchor, head=_head(records)).count == 3
    with pytest.raises(AuditChainError):
        verify_chain(records[3:], anchor=AuditHead(3, records[1].hash))


def test_export_round_trip_verifies_offline() -> None:
    records = _chain(7)
    buffer = io.StringIO()
    assert export_jsonl(records, buffer) == 7
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 7
    first = json.loads(lines[0])
    assert first["seq"] == 1
    assert first["time"] == "2030-05-06T07:08:10.654321Z"
    assert first["claims"]["tee"] == "sgx"
    parsed = list(read_jsonl(buffer.getvalue().splitlines(keepends=True)))
    assert parsed == records
    verify_chain(parsed, head=_head(records))


def test_tampered_export_is_found() -> None:
    records = _chain(4)
    buffer = io.StringIO()
    export_jsonl(records, buffer)
    lines = buffer.getvalue().splitlines()
    data = json.loads(lines[1])
    data["decision"] = "allow"
    lines[1] = json.dumps(data)
    with pytest.raises(AuditChainError) as info:
        verify_chain(read_jsonl(lines))
    assert info.value.seq == 2


@pytest.mark.parametrize(
    "line",
    [
        "not json",
        "[]",
        '{"seq": 1}',
        '{"seq": "1", "time": "x"}',
        "NaN",
    ],
)
def test_malformed_export_lines_are_refused(line: str) -> None:
    with pytest.raises(AuditError, match="line 1 is not valid"):
        list(read_jsonl([line]))


def test_export_with_bad_types_is_refused() -> None:
    good = _chain(1)[0].as_json()
    for key, bad in (("claims", [1]), ("model_ids", "m"), ("time", "2030-01-01"), ("seq", True)):
        with pytest.raises(AuditError):
            list(read_jsonl([json.dumps({**good, key: bad})]))


def test_entry_validation() -> None:
    with pytest.raises(ValueError, match="action"):
        AuditEntry(kind=AuditKind.ADMIN, action="Model Create", decision="ok")
    with pytest.raises(ValueError, match="decision"):
        AuditEntry(kind=AuditKind.ADMIN, action="x", decision="")
    with pytest.raises(ValueError, match=r"release.*admin"):
        AuditEntry(kind="other", action="x", decision="ok")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hex digest"):
        AuditEntry(kind=AuditKind.RELEASE, action="x", decision="ok", evidence_digest="XYZ")
    with pytest.raises(TypeError, match="not one string"):
        AuditEntry(kind=AuditKind.RELEASE, action="x", decision="ok", model_ids="abc")
    with pytest.raises(TypeError, match="mapping"):
        AuditEntry(kind=AuditKind.RELEASE, action="x", decision="ok", claims=[1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at most"):
        AuditEntry(kind=AuditKind.RELEASE, action="x", decision="ok", client_address="a" * 600)
    entry = AuditEntry(kind=AuditKind.RELEASE, action="x", decision="ok", claims={"b": b"raw"})
    with pytest.raises(TypeError):
        build_record(entry, seq=1, at=T0, prev_hash=GENESIS_HASH)
    entry = AuditEntry(
        kind=AuditKind.RELEASE, action="x", decision="ok", claims={"f": float("nan")}
    )
    with pytest.raises(ValueError, match=r"JSON compliant|Out of range"):
        build_record(entry, seq=1, at=T0, prev_hash=GENESIS_HASH)
    with pytest.raises(ValueError, match="start at 1"):
        build_record(_entry(2), seq=0, at=T0, prev_hash=GENESIS_HASH)


def test_hash_covers_time_to_the_microsecond() -> None:
    a = build_record(_entry(2), seq=1, at=T0, prev_hash=GENESIS_HASH)
    b = build_record(_entry(2), seq=1, at=T0 + timedelta(microseconds=1), prev_hash=GENESIS_HASH)
    assert a.hash != b.hash
    c = build_record(_entry(2), seq=1, at=T0.astimezone(UTC), prev_hash=GENESIS_HASH)
    assert c.hash == a.hash


def test_null_and_empty_string_hash_differently() -> None:
    base = AuditEntry(kind=AuditKind.ADMIN, action="x", decision="ok")
    a = build_record(base, seq=1, at=T0, prev_hash=GENESIS_HASH)
    b = build_record(dataclasses.replace(base, actor=""), seq=1, at=T0, prev_hash=GENESIS_HASH)
    assert a.hash != b.hash


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=12,
)


@given(claims=st.dictionaries(st.text(max_size=8), _json_values, max_size=6))
def test_export_round_trip_property(claims: dict[str, object]) -> None:
    entry = AuditEntry(kind=AuditKind.RELEASE, action="release", decision="deny", claims=claims)
    record = build_record(entry, seq=1, at=T0, prev_hash=GENESIS_HASH)
    buffer = io.StringIO()
    export_jsonl([record], buffer)
    (again,) = read_jsonl(buffer.getvalue().splitlines())
    assert again == record
    verify_chain([again])
