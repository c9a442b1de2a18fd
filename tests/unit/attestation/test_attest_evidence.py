"""Evidence values and wire form, claims, the report_data binding, and the verifier set."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import struct
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from attest_facts import SGX_REPORT_DATA, SGX_TIME, TDX_TIME

from sealtorch.attestation import (
    BINDING_DOMAIN_TAG,
    Claims,
    DcapVerifier,
    Evidence,
    SimAttester,
    SimVerifier,
    UnsupportedEvidenceError,
    UntrustedAttestationKeyError,
    VerifierSet,
    binding_reasons,
    detect_evidence,
    reason_for_error,
    report_data_for,
    verify_binding,
)
from sealtorch.attestation.claims import normalise_tcb_status
from sealtorch.errors import (
    AttestationError,
    CollateralError,
    ConfigError,
    EvidenceError,
    PolicyDenied,
)

# -- Evidence -------------------------------------------------------------------------------------


def test_wire_round_trip(sgx_evidence: Evidence) -> None:
    wire = sgx_evidence.to_wire()
    assert set(wire) == {"type", "data"}
    assert "=" not in wire["data"]
    assert Evidence.from_wire(wire) == sgx_evidence
    assert Evidence.from_wire(json.dumps(wire)) == sgx_evidence
    assert sgx_evidence.digest == hashlib.sha256(sgx_evidence.data).hexdigest()
    assert "bytes" in repr(sgx_evidence)


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        ("[]", "must be an object"),
        ("{", "not valid JSON"),
        ({"type": "sim"}, "missing field"),
        ({"type": "sim", "data": "AA", "extra": 1}, "unknown field"),
        ({"type": "sev", "data": "AA"}, "evidence.type must be one of"),
        ({"type": "sim", "data": "AA=="}, "base64url without padding"),
        ({"type": "sim", "data": "A+/A"}, "base64url without padding"),
        ({"type": "sim", "data": 12}, "base64url without padding"),
        ({"type": "sim", "data": "AAB"}, "canonical"),
        ({"type": "sim", "data": "A"}, "base64url"),
        ({"type": "sim", "data": ""}, "empty"),
        ({"type": "sim", "data": "A" * 70000}, "larger than"),
    ],
)
def test_from_wire_rejects(wire: object, message: str) -> None:
    with pytest.raises(EvidenceError, match=message):
        Evidence.from_wire(wire)


def test_evidence_constructor_validates() -> None:
    with pytest.raises(EvidenceError, match="unknown evidence type"):
        Evidence(type="sgx", data=b"x")  # type: ignore[arg-type]
    with pytest.raises(EvidenceError, match="empty"):
        Evidence(type="sim", data=b"")
    with pytest.raises(EvidenceError, match="at most"):
        Evidence(type="sim", data=b"x" * (48 * 1024 + 1))
    with pytest.raises(EvidenceError, match="bytes"):
        Evidence(type="sim", data="text")  # type: ignore[arg-type]


def test_detect_evidence_forms(
    sgx_evidence: Evidence, tdx_evidence: Evidence, sim_attester: SimAttester
) -> None:
    assert detect_evidence(sgx_evidence.data) == sgx_evidence
    assert detect_evidence(tdx_evidence.data) == tdx_evidence
    hex_text = sgx_evidence.data.hex()
    assert detect_evidence(hex_text.encode()) == sgx_evidence
    assert detect_evidence(b"0x" + hex_text.upper().encode() + b"\n") == sgx_evidence
    wrapped = "\n".join(hex_text[i : i + 64] for i in range(0, len(hex_text), 64))
    assert detect_evidence(wrapped.encode()) == sgx_evidence
    sim = sim_attester.evidence(SGX_REPORT_DATA)
    assert detect_evidence(sim.data) == sim
    assert detect_evidence(sim.data.hex().encode()) == sim
    assert detect_evidence(json.dumps(tdx_evidence.to_wire()).encode()) == tdx_evidence


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "empty"),
        (b"abc", "odd number"),
        (b"hello world", "not recognised"),
        (struct.pack("<HHI", 2, 2, 0) + b"\0" * 100, "not recognised"),
        (struct.pack("<HHI", 3, 2, 0x81) + b"\0" * 100, "not recognised"),
        (struct.pack("<HHI", 4, 2, 7) + b"\0" * 100, "not recognised"),
    ],
)
def test_detect_evidence_rejects(raw: bytes, message: str) -> None:
    with pytest.raises(EvidenceError, match=message):
        detect_evidence(raw)


# -- Claims ---------------------------------------------------------------------------------------


def test_claims_round_trip_through_json(sgx_verifier: DcapVerifier, sgx_evidence: Evidence) -> None:
    claims = sgx_verifier.verify(sgx_evidence, now=SGX_TIME)
    data = json.loads(json.dumps(claims.to_dict()))
    assert data["report_data"] == SGX_REPORT_DATA.hex()
    assert data["verified_at"] == "2025-06-19T11:56:11Z"
    assert Claims.from_dict(data) == claims


def _to_dict_by_fields(claims: Claims) -> dict[str, object]:
    """Claims.to_dict as it was before its fast path (each field through isinstance)."""
    out: dict[str, object] = {}
    for field in dataclasses.fields(claims):
        value = getattr(claims, field.name)
        if isinstance(value, bytes):
            value = value.hex()
        elif isinstance(value, datetime):
            value = value.astimezone(UTC).isoformat().replace("+00:00", "Z")
        elif isinstance(value, tuple):
            value = list(value)
        out[field.name] = value
    return out


def test_claims_to_dict_writes_what_the_field_by_field_conversion_wrote(
    sgx_verifier: DcapVerifier,
    sgx_evidence: Evidence,
    tdx_verifier: DcapVerifier,
    tdx_evidence: Evidence,
) -> None:
    """The audit record hashes these dicts: same keys, same order, same values, same JSON."""
    sgx = sgx_verifier.verify(sgx_evidence, now=SGX_TIME)
    tdx = tdx_verifier.verify(tdx_evidence, now=TDX_TIME)
    plus_two = timezone(timedelta(hours=2))
    variants = [
        sgx,
        tdx,
        dataclasses.replace(sgx, advisory_ids=("INTEL-SA-00001", "INTEL-SA-00615"), debug=True),
        dataclasses.replace(
            tdx,
            verified_at=datetime(2025, 6, 19, 13, 16, 3, 120, tzinfo=plus_two),
            collateral_issued_at=None,
            collateral_next_update=datetime(2030, 1, 1, tzinfo=UTC),
        ),
        dataclasses.replace(
            sgx,
            tee="snp",
            evidence_type="sev-snp",
            mrenclave=None,
            mrsigner=None,
            launch_measurement="ab" * 48,
            author_key_enabled=False,
            guest_policy=2**64 - 1,
            vmpl=0,
            tcb_fmc=7,
            snp_product="Genoa",
        ),
        dataclasses.replace(
            sgx,
            tee="sim",
            evidence_type="sim",
            simulated=True,
            sim_role="app",
            attestation_key="ed25519:" + "cd" * 32,
            tcb_status="UpToDate",
        ),
    ]
    for claims in variants:
        fast, reference = claims.to_dict(), _to_dict_by_fields(claims)
        assert list(fast.items()) == list(reference.items())
        assert json.dumps(fast) == json.dumps(reference)
        assert Claims.from_dict(json.loads(json.dumps(fast))) == claims


def test_claims_from_dict_refuses_malformed_records(
    tdx_verifier: DcapVerifier, tdx_evidence: Evidence
) -> None:
    data = tdx_verifier.verify(tdx_evidence, now=TDX_TIME).to_dict()
    for change in (
        {"extra": 1},
        {"report_data": "00"},
        {"mrtd": "XYZ"},
        {"debug": "no"},
        {"isv_svn": 70000},
        {"verified_at": "2025-06-19T11:16:03"},
        {"tee": "sev"},
        {"advisory_ids": [1]},
    ):
        with pytest.raises(EvidenceError):
            Claims.from_dict({**data, **change})
    missing = dict(data)
    del missing["tcb_status"]
    with pytest.raises(EvidenceError):
        Claims.from_dict(missing)


def test_claims_are_frozen(sgx_verifier: DcapVerifier, sgx_evidence: Evidence) -> None:
    claims = sgx_verifier.verify(sgx_evidence, now=SGX_TIME)
    with pytest.raises(dataclasses.FrozenInstanceError):
        claims.debug = True  # type: ignore[misc]


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("OK", "UpToDate"),
        ("UpToDate", "UpToDate"),
        ("SW_HARDENING_NEEDED", "SWHardeningNeeded"),
        ("CONFIGURATION_AND_SW_HARDENING_NEEDED", "ConfigurationAndSWHardeningNeeded"),
        ("OUT_OF_DATE", "OutOfDate"),
        ("OUT_OF_DATE_CONFIGURATION_NEEDED", "OutOfDateConfigurationNeeded"),
        ("REVOKED", "Revoked"),
        ("outofdate", "OutOfDate"),
        ("TDRelaunchAdvised", "TDRelaunchAdvised"),
    ],
)
def test_tcb_status_normalisation(raw: str, normalised: str) -> None:
    assert normalise_tcb_status(raw) == normalised


# -- binding --------------------------------------------------------------------------------------


def test_report_data_encoding_is_exactly_as_documented() -> None:
    nonce, suite, key = b"N" * 32, "DHKEM(X25519,HKDF-SHA256)/HKDF-SHA256/AES-256-GCM", b"K" * 32

    def lp(data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + data

    expected = hashlib.sha512(
        lp(b"sealtorch/v1/report-data") + lp(nonce) + lp(suite.encode()) + lp(key)
    ).digest()
    assert BINDING_DOMAIN_TAG == b"sealtorch/v1/report-data"
    assert report_data_for(nonce=nonce, hpke_suite=suite, public_key=key) == expected
    assert len(expected) == 64


def test_binding_is_injective_across_field_boundaries() -> None:
    a = report_data_for(nonce=b"n" * 16 + b"AB", hpke_suite="C", public_key=b"k")
    b = report_data_for(nonce=b"n" * 16 + b"A", hpke_suite="BC", public_key=b"k")
    c = report_data_for(nonce=b"n" * 16 + b"A", hpke_suite="B", public_key=b"Ck")
    assert len({a, b, c}) == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"nonce": b"short", "hpke_suite": "s", "public_key": b"k"},
        {"nonce": "n" * 32, "hpke_suite": "s", "public_key": b"k"},
        {"nonce": b"n" * 32, "hpke_suite": "", "public_key": b"k"},
        {"nonce": b"n" * 32, "hpke_suite": "a\nb", "public_key": b"k"},
        {"nonce": b"n" * 32, "hpke_suite": "s", "public_key": b""},
    ],
)
def test_binding_inputs_are_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        report_data_for(**kwargs)  # type: ignore[arg-type]


def test_binding_check_from_both_sides(
    sim_attester: SimAttester, sim_verifier: SimVerifier
) -> None:
    nonce, suite, key = b"\7" * 32, "suite-a", b"\1" * 32
    bound = report_data_for(nonce=nonce, hpke_suite=suite, public_key=key)
    claims = sim_verifier.verify(sim_attester.evidence(bound), now=datetime.now(UTC))
    assert binding_reasons(claims, bound) == ()
    assert verify_binding(claims, nonce=nonce, hpke_suite=suite, public_key=key) is claims
    # an attacker replays the evidence with their own HPKE key, another nonce or suite
    for changed in (
        {"nonce": b"\x08" * 32, "hpke_suite": suite, "public_key": key},
        {"nonce": nonce, "hpke_suite": "suite-b", "public_key": key},
        {"nonce": nonce, "hpke_suite": suite, "public_key": b"\2" * 32},
    ):
        with pytest.raises(PolicyDenied) as caught:
            verify_binding(claims, **changed)  # type: ignore[arg-type]
        assert caught.value.reasons == ("binding_mismatch",)


# -- VerifierSet and reason codes -----------------------------------------------------------------


def test_verifier_set_dispatches_by_type(
    sgx_verifier: DcapVerifier,
    sim_verifier: SimVerifier,
    sim_attester: SimAttester,
    sgx_evidence: Evidence,
) -> None:
    both = VerifierSet(sgx_verifier, sim_verifier)
    assert both.evidence_types == {"sgx-dcap", "tdx-dcap", "sim"}
    assert both.verify(sgx_evidence, now=SGX_TIME).tee == "sgx"
    assert both.verify(sim_attester.evidence(b"\0" * 64), now=SGX_TIME).tee == "sim"
    dcap_only = VerifierSet(sgx_verifier)
    with pytest.raises(UnsupportedEvidenceError, match="trusted sim attestation keys") as caught:
        dcap_only.verify(sim_attester.evidence(b"\0" * 64), now=SGX_TIME)
    assert reason_for_error(caught.value) == "simulated_not_allowed"
    sim_only = VerifierSet(sim_verifier)
    with pytest.raises(UnsupportedEvidenceError, match="accepted: sim") as unsupported:
        sim_only.verify(sgx_evidence, now=SGX_TIME)
    assert reason_for_error(unsupported.value) == "tee_not_allowed"
    with pytest.raises(UnsupportedEvidenceError, match="accepted: none"):
        VerifierSet().verify(sgx_evidence, now=SGX_TIME)
    with pytest.raises(ConfigError, match="two verifiers"):
        VerifierSet(sgx_verifier, sgx_verifier)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (CollateralError("x", stale=True), "collateral_stale"),
        (CollateralError("x"), "collateral_unavailable"),
        (EvidenceError("x"), "evidence_invalid"),
        (UntrustedAttestationKeyError("x"), "attestation_key_untrusted"),
        (PolicyDenied(["debug_enclave", "binding_mismatch"], "x"), "debug_enclave"),
        (AttestationError("x"), "evidence_invalid"),
    ],
)
def test_reason_for_error(error: AttestationError, code: str) -> None:
    assert reason_for_error(error) == code


def test_base64_helpers_agree_with_protocol_encoding(sgx_evidence: Evidence) -> None:
    data = sgx_evidence.to_wire()["data"]
    assert base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)) == sgx_evidence.data


def test_documented_test_vector() -> None:
    doc = (Path(__file__).resolve().parents[3] / "docs" / "attestation.md").read_text()
    block = doc[doc.index("report_data = 78191a24") :].split("```")[0]
    documented = "".join(block.replace("report_data =", "").split())
    computed = report_data_for(
        nonce=bytes(range(32)),
        hpke_suite="DHKEM(X25519,HKDF-SHA256)/HKDF-SHA256/AES-256-GCM",
        public_key=bytes(range(32, 64)),
    )
    assert documented == computed.hex()


def test_make_verifiers_from_settings(
    attestation_samples: Path,
    tmp_path: Path,
    sim_attester: SimAttester,
    sgx_evidence: Evidence,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sealtorch.attestation import default_collateral_cache_dir, make_verifiers

    file_only = make_verifiers(collateral_path=attestation_samples / "sgx_quote_collateral.json")
    assert file_only.evidence_types == {"sgx-dcap", "tdx-dcap"}
    assert file_only.verify(sgx_evidence, now=SGX_TIME).tee == "sgx"
    directory = make_verifiers(
        collateral_path=attestation_samples, sim_trusted_keys=[sim_attester.public_key]
    )
    # a collateral directory also serves SNP from its snp/ folder
    assert directory.evidence_types == {"sgx-dcap", "tdx-dcap", "sev-snp", "sim"}
    assert directory.verify(sgx_evidence, now=SGX_TIME).tee == "sgx"
    sim_only = make_verifiers(sim_trusted_keys=[sim_attester.public_key])
    assert sim_only.evidence_types == {"sim"}
    pccs = make_verifiers(pccs_url="http://127.0.0.1:9", cache_dir=tmp_path)
    assert pccs.evidence_types == {"sgx-dcap", "tdx-dcap", "sev-snp"}
    with pytest.raises(ConfigError, match="no attestation verifier"):
        make_verifiers()
    with pytest.raises(ConfigError, match="not both"):
        make_verifiers(pccs_url="http://x", collateral_path=attestation_samples)
    with pytest.raises(ConfigError, match="only applies with a PCCS URL"):
        make_verifiers(cache_dir=tmp_path, sim_trusted_keys=[sim_attester.public_key])
    with pytest.raises(ConfigError, match="PCCS URL must be"):
        make_verifiers(pccs_url="ftp://x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_collateral_cache_dir() == tmp_path / "cache" / "sealtorch" / "collateral"
