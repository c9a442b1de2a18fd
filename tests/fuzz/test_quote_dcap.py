"""Malformed DCAP quotes of any length give a clean AttestationError, never a crash."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sealtorch.attestation import (
    EVIDENCE_TYPES,
    CollateralDirectory,
    DcapVerifier,
    Evidence,
    EvidenceType,
    detect_evidence,
)
from sealtorch.errors import AttestationError, EvidenceError

SGX_TIME = datetime.fromtimestamp(1750334171, UTC)
TDX_TIME = datetime.fromtimestamp(1750331763, UTC)
_FUZZ = settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def verifier(attestation_samples: Path, tmp_path_factory: pytest.TempPathFactory) -> DcapVerifier:
    directory = tmp_path_factory.mktemp("collateral")
    for name in ("sgx_quote_collateral.json", "tdx_quote_collateral.json"):
        (directory / name).write_bytes((attestation_samples / name).read_bytes())
    return DcapVerifier(collateral=CollateralDirectory(directory))


@pytest.fixture(scope="module")
def quotes(attestation_samples: Path) -> dict[str, bytes]:
    return {
        "sgx-dcap": (attestation_samples / "sgx_quote").read_bytes(),
        "tdx-dcap": (attestation_samples / "tdx_quote").read_bytes(),
    }


def _verify(verifier: DcapVerifier, kind: EvidenceType, data: bytes, now: datetime) -> object:
    try:
        return verifier.verify(Evidence(type=kind, data=data), now=now)
    except AttestationError as exc:
        refusal = exc
    assert str(refusal)  # every refusal explains itself
    return refusal


@_FUZZ
@given(data=st.binary(min_size=0, max_size=12000), kind=st.sampled_from(["sgx-dcap", "tdx-dcap"]))
def test_arbitrary_bytes(verifier: DcapVerifier, data: bytes, kind: EvidenceType) -> None:
    result = _verify(verifier, kind, data, SGX_TIME)
    # Random bytes never carry an Intel-issued PCK certificate, so this is always a clean
    # evidence error (not even a collateral lookup).
    assert isinstance(result, EvidenceError)


@_FUZZ
@given(
    kind=st.sampled_from(["sgx-dcap", "tdx-dcap"]),
    cut=st.integers(min_value=0, max_value=6000),
    edits=st.lists(
        st.tuples(st.integers(min_value=0, max_value=5999), st.integers(0, 255)), max_size=8
    ),
    tail=st.binary(max_size=64),
)
def test_mutated_samples_are_refused_or_unchanged(
    verifier: DcapVerifier,
    quotes: dict[str, bytes],
    kind: EvidenceType,
    cut: int,
    edits: list[tuple[int, int]],
    tail: bytes,
) -> None:
    """A mutation is refused, or it only touched unsigned transport bytes (the PEM text of the
    PCK chain): the claims are then exactly those of the original quote."""
    original = quotes[kind]
    now = SGX_TIME if kind == "sgx-dcap" else TDX_TIME
    mutated = bytearray(original[:cut] + tail)
    for index, value in edits:
        if index < len(mutated):
            mutated[index] = value
    result = _verify(verifier, kind, bytes(mutated), now)
    if not isinstance(result, AttestationError):
        expected = verifier.verify(Evidence(type=kind, data=original), now=now).to_dict()
        got = result.to_dict()  # type: ignore[attr-defined]
        for varying in ("evidence_digest",):
            expected.pop(varying)
            got.pop(varying)
        assert got == expected


@_FUZZ
@given(data=st.binary(max_size=4096))
def test_detect_evidence_never_crashes(data: bytes) -> None:
    try:
        evidence = detect_evidence(data)
    except EvidenceError as exc:
        outcome = str(exc)
    else:
        assert evidence.type in EVIDENCE_TYPES
        assert 0 < len(evidence.data) <= len(data)
        outcome = evidence.type
    assert outcome


@_FUZZ
@given(
    obj=st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=40),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(st.sampled_from(["type", "data", "x"]), inner, max_size=3)
        ),
        max_leaves=8,
    )
)
def test_wire_form_never_crashes(obj: object) -> None:
    try:
        evidence = Evidence.from_wire(obj)
    except EvidenceError as exc:
        outcome = str(exc)
    else:
        assert evidence.to_wire() == obj
        outcome = evidence.type
    assert outcome
