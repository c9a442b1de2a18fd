"""Property tests: the SNP report and certificate table parsers fail only with EvidenceError."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from sealtorch.attestation.snp_report import (
    REPORT_SIZE,
    build_cert_table,
    parse_cert_table,
    parse_report,
    trim_cert_table,
)
from sealtorch.errors import EvidenceError

_REAL = bytes.fromhex(
    (Path(__file__).resolve().parents[2] / "data" / "attestation" / "snp" / "report_milan.hex")
    .read_text()
    .strip()
)


@given(st.lists(st.tuples(st.integers(0, REPORT_SIZE - 1), st.integers(1, 255)), max_size=8))
def test_mutated_reports_parse_or_fail_cleanly(edits: list[tuple[int, int]]) -> None:
    raw = bytearray(_REAL)
    for position, flip in edits:
        raw[position] ^= flip
    try:
        parsed = parse_report(bytes(raw))
    except EvidenceError:
        return
    assert parsed.raw == bytes(raw)


@given(st.binary(max_size=600))
def test_arbitrary_cert_tables_parse_or_fail_cleanly(table: bytes) -> None:
    try:
        certs = parse_cert_table(table)
    except EvidenceError:
        return
    assert all(isinstance(value, bytes) and value for value in certs.values())


@given(st.dictionaries(st.uuids(), st.binary(min_size=1, max_size=64), max_size=4))
def test_cert_tables_round_trip(certs: dict[object, bytes]) -> None:
    table = build_cert_table(certs)  # type: ignore[arg-type]
    padded = table + b"\0" * 100  # the unused end of the kernel's buffer
    assert parse_cert_table(padded) == certs
    assert trim_cert_table(padded) == (table if certs else b"")
