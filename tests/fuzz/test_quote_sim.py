"""Malformed simulated-TEE evidence gives a clean EvidenceError, never a crash or acceptance."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sealtorch.attestation import Evidence, SimAttester, SimVerifier
from sealtorch.attestation.evidence import SIM_EVIDENCE_MAGIC
from sealtorch.errors import EvidenceError

NOW = datetime(2026, 1, 1, tzinfo=UTC)
_FUZZ = settings(max_examples=500)


@pytest.fixture(scope="module")
def attester(tmp_path_factory: pytest.TempPathFactory) -> SimAttester:
    return SimAttester(
        "serve",
        key_path=tmp_path_factory.mktemp("sim") / "k",
        advisory_ids=["INTEL-SA-00615"],
    )


@pytest.fixture(scope="module")
def verifier(attester: SimAttester) -> SimVerifier:
    return SimVerifier(trusted_keys=[attester.public_key])


@pytest.fixture(scope="module")
def genuine(attester: SimAttester) -> bytes:
    return attester.evidence(b"\x42" * 64).data


@_FUZZ
@given(body=st.binary(max_size=600), with_magic=st.booleans())
def test_arbitrary_bytes_are_refused(verifier: SimVerifier, body: bytes, with_magic: bool) -> None:
    data = (SIM_EVIDENCE_MAGIC if with_magic else b"") + body
    with pytest.raises(EvidenceError):
        verifier.verify(Evidence(type="sim", data=data), now=NOW)


@_FUZZ
@given(
    cut=st.integers(min_value=0, max_value=400),
    edits=st.lists(
        st.tuples(st.integers(min_value=0, max_value=399), st.integers(0, 255)),
        min_size=0,
        max_size=6,
    ),
    tail=st.binary(max_size=16),
)
def test_any_change_to_genuine_evidence_is_refused(
    verifier: SimVerifier, genuine: bytes, cut: int, edits: list[tuple[int, int]], tail: bytes
) -> None:
    mutated = bytearray(genuine[:cut] + tail)
    for index, value in edits:
        if index < len(mutated):
            mutated[index] = value
    if bytes(mutated) == genuine:
        assert verifier.verify(Evidence(type="sim", data=genuine), now=NOW).simulated
        return
    with pytest.raises(EvidenceError):
        verifier.verify(Evidence(type="sim", data=bytes(mutated)), now=NOW)
