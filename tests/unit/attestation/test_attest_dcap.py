"""The dcap verifier on the real Intel-signed SGX and TDX samples."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from attest_facts import (
    SGX_ADVISORIES,
    SGX_COLLATERAL_EXPIRY,
    SGX_FMSPC,
    SGX_MRENCLAVE,
    SGX_MRSIGNER,
    SGX_REPORT_DATA,
    SGX_TIME,
    TDX_COLLATERAL_EXPIRY,
    TDX_FMSPC,
    TDX_MRTD,
    TDX_REPORT_DATA,
    TDX_RTMR0,
    TDX_TIME,
)

from sealtorch.attestation import (
    CollateralDirectory,
    CollateralFile,
    DcapVerifier,
    Evidence,
    SimAttester,
    UnsupportedEvidenceError,
)
from sealtorch.errors import CollateralError, ConfigError, EvidenceError


def test_sgx_sample_verifies_at_its_collateral_time(
    sgx_verifier: DcapVerifier, sgx_evidence: Evidence
) -> None:
    claims = sgx_verifier.verify(sgx_evidence, now=SGX_TIME)
    assert claims.tee == "sgx"
    assert claims.evidence_type == "sgx-dcap"
    assert not claims.simulated
    assert not claims.debug
    assert claims.mrenclave == SGX_MRENCLAVE
    assert claims.mrsigner == SGX_MRSIGNER
    assert claims.isv_prod_id == 0
    assert claims.isv_svn == 0
    assert claims.attributes == "0500000000000000e700000000000000"
    assert claims.report_data == SGX_REPORT_DATA
    assert claims.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert claims.advisory_ids == SGX_ADVISORIES
    assert claims.fmspc == SGX_FMSPC.lower()
    assert claims.collateral_next_update == SGX_COLLATERAL_EXPIRY
    assert claims.collateral_issued_at == datetime(2025, 6, 19, 10, 56, 11, tzinfo=UTC)
    assert claims.verified_at == SGX_TIME
    assert claims.evidence_digest == hashlib.sha256(sgx_evidence.data).hexdigest()
    assert claims.mrtd is None
    assert claims.measurement == SGX_MRENCLAVE


def test_tdx_sample_verifies_at_its_collateral_time(
    tdx_verifier: DcapVerifier, tdx_evidence: Evidence
) -> None:
    claims = tdx_verifier.verify(tdx_evidence, now=TDX_TIME)
    assert claims.tee == "tdx"
    assert claims.evidence_type == "tdx-dcap"
    assert claims.tcb_status == "UpToDate"
    assert claims.advisory_ids == ()
    assert claims.mrtd == TDX_MRTD
    assert claims.mrtd.startswith("91eb2b44d141d4ec")
    assert claims.rtmr0 == TDX_RTMR0
    assert claims.rtmr3 == "00" * 48
    assert claims.td_attributes == "0000001000000000"
    assert not claims.debug
    assert claims.report_data == TDX_REPORT_DATA
    assert claims.fmspc == TDX_FMSPC.lower()
    assert claims.collateral_next_update == TDX_COLLATERAL_EXPIRY
    assert claims.mrenclave is None
    assert claims.measurement == TDX_MRTD


@pytest.mark.parametrize("which", ["sgx", "tdx"])
def test_samples_today_are_refused_as_stale_collateral(
    which: str, request: pytest.FixtureRequest
) -> None:
    verifier: DcapVerifier = request.getfixturevalue(f"{which}_verifier")
    evidence: Evidence = request.getfixturevalue(f"{which}_evidence")
    with pytest.raises(CollateralError, match="stale") as caught:
        verifier.verify(evidence, now=datetime.now(UTC))
    assert caught.value.stale


def test_collateral_boundary_is_exact(sgx_verifier: DcapVerifier, sgx_evidence: Evidence) -> None:
    sgx_verifier.verify(sgx_evidence, now=SGX_COLLATERAL_EXPIRY - timedelta(seconds=1))
    with pytest.raises(CollateralError) as caught:
        sgx_verifier.verify(sgx_evidence, now=SGX_COLLATERAL_EXPIRY)
    assert caught.value.stale


def test_dcap_qvl_expiry_errors_are_classified_stale(
    attestation_samples: Path, sgx_evidence: Evidence, tmp_path: Path
) -> None:
    """Even if our own window check were bypassed, dcap-qvl's expiry errors mean stale."""

    class NoWindowCheck(CollateralFile):
        def collateral_for(self, key, *, now):  # type: ignore[no-untyped-def]
            collateral = super().collateral_for(key, now=now)
            return type(collateral)(
                key=collateral.key,
                issued_at=collateral.issued_at,
                next_update=datetime(2100, 1, 1, tzinfo=UTC),
                source=collateral.source,
                json_text=collateral.json_text,
                qvl=collateral.qvl,
            )

    verifier = DcapVerifier(
        collateral=NoWindowCheck(attestation_samples / "sgx_quote_collateral.json")
    )
    for moment in (datetime(2025, 8, 1, tzinfo=UTC), datetime.now(UTC)):
        with pytest.raises(CollateralError) as caught:
            verifier.verify(sgx_evidence, now=moment)
        assert caught.value.stale, caught.value


def test_time_before_collateral_issue_is_not_accepted(
    sgx_verifier: DcapVerifier, sgx_evidence: Evidence
) -> None:
    with pytest.raises(CollateralError, match="check the clock") as caught:
        sgx_verifier.verify(sgx_evidence, now=datetime(2025, 6, 1, tzinfo=UTC))
    assert not caught.value.stale


def test_naive_time_is_a_programming_error(
    sgx_verifier: DcapVerifier, sgx_evidence: Evidence
) -> None:
    with pytest.raises(ConfigError, match="timezone"):
        sgx_verifier.verify(sgx_evidence, now=datetime(2025, 6, 19, 12))


# Offsets of the signed structures (Intel DCAP quote formats).
# SGX v3: header 0..48, report body 48..432, signature length 432..436, ECDSA signature
# 436..500, attestation key 500..564, QE report 564..948, QE report signature 948..1012.
# TDX v4: header 0..48, TD report 48..632, ECDSA signature 636..700, attestation key 700..764,
# (certification type/size 764..770), QE report 770..1154, QE report signature 1154..1218.
_SGX_SIGNED = range(1012)
_TDX_SIGNED = [*range(632), *range(636, 764), *range(770, 1218)]


@pytest.mark.parametrize(
    ("which", "offsets", "time"),
    [("sgx", _SGX_SIGNED, SGX_TIME), ("tdx", _TDX_SIGNED, TDX_TIME)],
)
def test_every_flipped_byte_of_body_qe_report_and_signatures_is_refused(
    which: str, offsets: list[int], time: datetime, request: pytest.FixtureRequest
) -> None:
    verifier: DcapVerifier = request.getfixturevalue(f"{which}_verifier")
    evidence: Evidence = request.getfixturevalue(f"{which}_evidence")
    accepted = []
    for offset in offsets:
        tampered = bytearray(evidence.data)
        tampered[offset] ^= 0x01
        try:
            verifier.verify(Evidence(type=evidence.type, data=bytes(tampered)), now=time)
        except (EvidenceError, CollateralError):
            continue
        accepted.append(offset)
    assert accepted == []


def test_readme_example_flip_gives_the_report_signature_error(
    sgx_verifier: DcapVerifier, sgx_evidence: Evidence
) -> None:
    tampered = bytearray(sgx_evidence.data)
    tampered[112] ^= 1
    with pytest.raises(EvidenceError, match="ISV enclave report signature is invalid"):
        sgx_verifier.verify(Evidence(type="sgx-dcap", data=bytes(tampered)), now=SGX_TIME)


def test_a_mislabelled_quote_is_refused(tdx_verifier: DcapVerifier, tdx_evidence: Evidence) -> None:
    with pytest.raises(EvidenceError, match="labelled 'sgx-dcap' but is a tdx-dcap quote"):
        tdx_verifier.verify(Evidence(type="sgx-dcap", data=tdx_evidence.data), now=TDX_TIME)


def test_sim_evidence_never_verifies_under_dcap(
    sgx_verifier: DcapVerifier, sim_attester: SimAttester
) -> None:
    sim = sim_attester.evidence(SGX_REPORT_DATA)
    with pytest.raises(UnsupportedEvidenceError):
        sgx_verifier.verify(sim, now=SGX_TIME)
    # relabelled as a quote, it does not parse
    for label in ("sgx-dcap", "tdx-dcap"):
        with pytest.raises(EvidenceError, match="not a valid DCAP quote"):
            sgx_verifier.verify(Evidence(type=label, data=sim.data), now=SGX_TIME)  # type: ignore[arg-type]


def test_collateral_of_another_platform_is_refused(
    attestation_samples: Path, tdx_evidence: Evidence
) -> None:
    verifier = DcapVerifier(
        collateral=CollateralFile(attestation_samples / "sgx_quote_collateral.json")
    )
    with pytest.raises(CollateralError, match="needs TDX FMSPC B0C06F000000") as caught:
        verifier.verify(tdx_evidence, now=TDX_TIME)
    assert not caught.value.stale


def test_tampered_collateral_is_refused(
    attestation_samples: Path, sgx_evidence: Evidence, tmp_path: Path
) -> None:
    data = json.loads((attestation_samples / "sgx_quote_collateral.json").read_text())
    tcb = json.loads(data["tcb_info"])
    # Declare every TCB level UpToDate: the signature over tcb_info no longer matches.
    for level in tcb["tcbLevels"]:
        level["tcbStatus"] = "UpToDate"
        level["advisoryIDs"] = []
    data["tcb_info"] = json.dumps(tcb, separators=(",", ":"))
    (tmp_path / "forged.json").write_text(json.dumps(data))
    verifier = DcapVerifier(collateral=CollateralFile(tmp_path / "forged.json"))
    with pytest.raises(CollateralError, match="tcb_info") as caught:
        verifier.verify(sgx_evidence, now=SGX_TIME)
    assert not caught.value.stale


def test_one_verifier_for_both_tees_from_a_directory(
    attestation_samples: Path,
    tmp_path: Path,
    sgx_evidence: Evidence,
    tdx_evidence: Evidence,
) -> None:
    for name in ("sgx_quote_collateral.json", "tdx_quote_collateral.json"):
        (tmp_path / f"any-name-{name}").write_bytes((attestation_samples / name).read_bytes())
    verifier = DcapVerifier(collateral=CollateralDirectory(tmp_path))
    assert verifier.verify(sgx_evidence, now=SGX_TIME).tee == "sgx"
    assert verifier.verify(tdx_evidence, now=TDX_TIME).tee == "tdx"
