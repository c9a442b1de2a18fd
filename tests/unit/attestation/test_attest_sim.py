"""The simulated TEE: measurement, host key, evidence format, and verification (attacker side)."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from attest_facts import SGX_REPORT_DATA

import sealtorch
from sealtorch.attestation import (
    KNOWN_ROLES,
    SIM_MRSIGNER,
    Evidence,
    SimAttester,
    SimVerifier,
    UnsupportedEvidenceError,
    UntrustedAttestationKeyError,
    default_sim_key_path,
    format_sim_public_key,
    load_or_create_sim_key,
    measure,
    parse_sim_public_key,
)
from sealtorch.errors import ConfigError, EvidenceError

NOW = datetime(2026, 1, 1, tzinfo=UTC)
PACKAGE = Path(sealtorch.__file__).resolve().parent


def test_evidence_verifies_into_sgx_style_claims(
    sim_attester: SimAttester, sim_verifier: SimVerifier
) -> None:
    evidence = sim_attester.evidence(SGX_REPORT_DATA)
    assert evidence.type == "sim"
    claims = sim_verifier.verify(evidence, now=NOW)
    assert claims.tee == "sim"
    assert claims.simulated
    assert not claims.debug
    assert claims.mrenclave == measure("serve")
    assert claims.mrsigner == SIM_MRSIGNER
    assert claims.isv_prod_id == 0
    assert claims.isv_svn == 0
    assert claims.tcb_status == "UpToDate"
    assert claims.advisory_ids == ()
    assert claims.report_data == SGX_REPORT_DATA
    assert claims.sim_role == "serve"
    assert claims.attestation_key == sim_attester.public_key
    assert claims.verified_at == NOW
    assert claims.collateral_next_update is None
    assert claims.evidence_digest == hashlib.sha256(evidence.data).hexdigest()


def test_test_knobs_show_up_in_the_claims(tmp_path: Path) -> None:
    attester = SimAttester(
        "keycache",
        key_path=tmp_path / "k",
        debug=True,
        tcb_status="SWHardeningNeeded",
        advisory_ids=["INTEL-SA-00615"],
        isv_prod_id=3,
        isv_svn=9,
    )
    claims = SimVerifier(trusted_keys=[attester.public_key]).verify(
        attester.evidence(b"\0" * 64), now=NOW
    )
    assert claims.debug
    assert claims.tcb_status == "SWHardeningNeeded"
    assert claims.advisory_ids == ("INTEL-SA-00615",)
    assert (claims.isv_prod_id, claims.isv_svn) == (3, 9)
    assert claims.mrenclave == measure("keycache")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tcb_status": "Fine"},
        {"advisory_ids": ["bad id"]},
        {"isv_svn": 70000},
        {"isv_prod_id": -1},
        {"role": "Serve"},
        {"role": "../x"},
    ],
)
def test_attester_options_are_validated(tmp_path: Path, kwargs: dict[str, object]) -> None:
    options: dict[str, object] = {"role": "serve", "key_path": tmp_path / "k", **kwargs}
    with pytest.raises(ConfigError):
        SimAttester(**options)  # type: ignore[arg-type]


def test_report_data_must_be_64_bytes(sim_attester: SimAttester) -> None:
    for bad in (b"", b"\0" * 63, b"\0" * 65):
        with pytest.raises(EvidenceError, match="exactly 64 bytes"):
            sim_attester.evidence(bad)


# -- measurement ----------------------------------------------------------------------------------


def test_measurement_is_deterministic_and_role_specific() -> None:
    values = {role: measure(role) for role in KNOWN_ROLES}
    assert len(set(values.values())) == len(KNOWN_ROLES)
    assert values == {role: measure(role) for role in KNOWN_ROLES}


def test_a_code_change_changes_the_measurement(tmp_path: Path) -> None:
    copy = tmp_path / "sealtorch"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    original = measure("serve", package_root=copy)
    assert original == measure("serve")  # a faithful copy measures the same
    # Bytecode caches do not count ...
    (copy / "__pycache__").mkdir(exist_ok=True)
    (copy / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"junk")
    (copy / "stray.pyc").write_bytes(b"junk")
    assert measure("serve", package_root=copy) == original
    # ... but one changed byte of code does, and so do added and renamed files.
    target = copy / "attestation" / "policy.py"
    target.write_bytes(target.read_bytes().replace(b"debug_enclave", b"debug_enclavE", 1))
    changed = measure("serve", package_root=copy)
    assert changed != original
    (copy / "extra.py").write_text("")
    assert measure("serve", package_root=copy) not in (original, changed)
    (copy / "extra.py").rename(copy / "extra2.py")
    assert measure("serve", package_root=copy) not in (original, changed)


def test_measurement_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        measure("")
    with pytest.raises(ConfigError, match="not a directory"):
        measure("serve", package_root=tmp_path / "missing")


# -- the host key ---------------------------------------------------------------------------------


def test_key_is_created_once_with_private_modes(tmp_path: Path) -> None:
    path = tmp_path / "state" / "sealtorch" / "sim.key"
    first = load_or_create_sim_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_or_create_sim_key(path).public_key == first.public_key
    assert first.public_key.hex() in repr(first)
    assert path.read_text().strip() not in repr(first)
    assert [p.name for p in path.parent.iterdir()] == ["sim.key"]  # no temp files left


def test_concurrent_first_use_agrees_on_one_key(tmp_path: Path) -> None:
    path = tmp_path / "sim.key"
    keys: list[bytes] = []
    barrier = threading.Barrier(8)

    def create() -> None:
        barrier.wait()
        keys.append(load_or_create_sim_key(path).public_key)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(keys)) == 1


def test_a_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sim.key"
    load_or_create_sim_key(path)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_or_create_sim_key(path)


def test_a_damaged_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sim.key"
    for content in (b"hello", b"sealtorch-sim-attestation-key-v1:AAAA", b"\xff\xfe"):
        path.write_bytes(content)
        path.chmod(0o600)
        with pytest.raises(ConfigError):
            load_or_create_sim_key(path)


def test_default_key_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SEALTORCH_SIM_KEY", str(tmp_path / "a.key"))
    assert default_sim_key_path() == tmp_path / "a.key"
    monkeypatch.delenv("SEALTORCH_SIM_KEY")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_sim_key_path() == tmp_path / "data" / "sealtorch" / "sim-attestation.key"
    # an attester without key_path uses it
    SimAttester("app").evidence(b"\0" * 64)
    assert (tmp_path / "data" / "sealtorch" / "sim-attestation.key").is_file()


def test_public_key_text_form(sim_attester: SimAttester) -> None:
    text = sim_attester.public_key
    assert text.startswith("ed25519:")
    raw = parse_sim_public_key(text)
    assert format_sim_public_key(raw) == text
    assert parse_sim_public_key(raw) == raw
    for bad in ("", text[8:], "ed25519:zz", text + "00", b"short"):
        with pytest.raises(ConfigError):
            parse_sim_public_key(bad)


# -- the verifier, from the attacker's side -------------------------------------------------------


def test_untrusted_key_is_refused(sim_attester: SimAttester, tmp_path: Path) -> None:
    stranger = SimAttester("serve", key_path=tmp_path / "stranger.key")
    verifier = SimVerifier(trusted_keys=[sim_attester.public_key])
    with pytest.raises(UntrustedAttestationKeyError, match="untrusted attestation key"):
        verifier.verify(stranger.evidence(SGX_REPORT_DATA), now=NOW)


def test_a_verifier_must_trust_some_key() -> None:
    with pytest.raises(ConfigError, match="at least one"):
        SimVerifier(trusted_keys=[])


def test_swapping_in_a_trusted_public_key_does_not_help(
    sim_attester: SimAttester, tmp_path: Path
) -> None:
    """An attacker signs with their own key but writes the trusted public key into the body."""
    stranger = SimAttester("serve", key_path=tmp_path / "stranger.key")
    forged = bytearray(stranger.evidence(SGX_REPORT_DATA).data)
    trusted = parse_sim_public_key(sim_attester.public_key)
    offset = forged.index(parse_sim_public_key(stranger.public_key))
    forged[offset : offset + 32] = trusted
    verifier = SimVerifier(trusted_keys=[sim_attester.public_key])
    with pytest.raises(EvidenceError, match="signature is invalid"):
        verifier.verify(Evidence(type="sim", data=bytes(forged)), now=NOW)


def test_every_flipped_byte_is_refused(
    sim_attester: SimAttester, sim_verifier: SimVerifier
) -> None:
    data = sim_attester.evidence(SGX_REPORT_DATA).data
    for offset in range(len(data)):
        tampered = bytearray(data)
        tampered[offset] ^= 0x01
        with pytest.raises(EvidenceError):
            sim_verifier.verify(Evidence(type="sim", data=bytes(tampered)), now=NOW)


def test_truncated_or_extended_evidence_is_refused(
    sim_attester: SimAttester, sim_verifier: SimVerifier
) -> None:
    data = sim_attester.evidence(SGX_REPORT_DATA).data
    for size in range(1, len(data)):
        with pytest.raises(EvidenceError):
            sim_verifier.verify(Evidence(type="sim", data=data[:size]), now=NOW)
    with pytest.raises(EvidenceError, match="wrong length"):
        sim_verifier.verify(Evidence(type="sim", data=data + b"\0"), now=NOW)


def test_debug_flag_cannot_be_cleared_without_breaking_the_signature(tmp_path: Path) -> None:
    attester = SimAttester("serve", key_path=tmp_path / "k", debug=True)
    data = bytearray(attester.evidence(b"\0" * 64).data)
    attributes_offset = len(b"SEALTORCH-SIM-EVIDENCE-V1\x00")
    assert data[attributes_offset] & 0x02
    data[attributes_offset] &= ~0x02 & 0xFF
    with pytest.raises(EvidenceError, match="signature is invalid"):
        SimVerifier(trusted_keys=[attester.public_key]).verify(
            Evidence(type="sim", data=bytes(data)), now=NOW
        )


def test_dcap_quotes_never_verify_under_the_sim_verifier(
    sim_verifier: SimVerifier, sgx_evidence: Evidence
) -> None:
    with pytest.raises(UnsupportedEvidenceError):
        sim_verifier.verify(sgx_evidence, now=NOW)
    with pytest.raises(EvidenceError, match="magic"):
        sim_verifier.verify(Evidence(type="sim", data=sgx_evidence.data), now=NOW)


def test_key_file_never_leaks_into_evidence(sim_attester: SimAttester) -> None:
    evidence = sim_attester.evidence(SGX_REPORT_DATA)
    key_text = sim_attester.key_path.read_text().strip()
    seed_b64 = key_text.split(":", 1)[1]
    import base64

    seed = base64.urlsafe_b64decode(seed_b64 + "=" * (-len(seed_b64) % 4))
    assert seed not in evidence.data
    assert seed.hex() not in repr(sim_attester)
    assert os.fspath(sim_attester.key_path) in repr(sim_attester)
