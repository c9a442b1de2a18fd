"""The SNP verifier on AMD's real Milan report, and from the attacker's side."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
from attest_facts import (
    SNP_MEASUREMENT,
    SNP_MILAN_ARK_SHA256,
    SNP_REPORT_DATA,
    SNP_REPORTED_TCB,
    SNP_TIME,
)
from cryptography.hazmat.primitives.serialization import Encoding

from _fixtures.snp import NOW, FakeAmd
from sealtorch._crypto import amdsev
from sealtorch.attestation import (
    AMD_ROOTS,
    Evidence,
    Policy,
    SnpCollateralDirectory,
    SnpVerifier,
    detect_evidence,
    report_data_for,
)
from sealtorch.attestation.snp_report import (
    GUID_VCEK,
    REPORT_SIZE,
    SIGNED_SIZE,
    build_cert_table,
    parse_report,
)
from sealtorch.attestation.snp_roots import AMD_ARK_SHA256, AMD_CHAIN_PEM
from sealtorch.errors import CollateralError, EvidenceError


@pytest.fixture(scope="module")
def real(attestation_samples: Path) -> dict[str, bytes]:
    folder = attestation_samples / "snp"
    return {
        "report": bytes.fromhex((folder / "report_milan.hex").read_text().strip()),
        "vcek": (folder / "vcek_milan.der").read_bytes(),
        "chain": (folder / "cert_chain_milan").read_bytes(),
    }


@pytest.fixture
def real_cache(tmp_path: Path, real: dict[str, bytes]) -> Path:
    """An operator's cache with AMD's real Milan chain and the real VCEK (no CRL: none was
    captured with the sample, see tests/data/attestation/README.md)."""
    folder = tmp_path / "snp" / "Milan"
    (folder / "vcek").mkdir(parents=True)
    (folder / "cert_chain.pem").write_bytes(real["chain"])
    report = parse_report(real["report"])
    name = f"{report.chip_id.hex()}-{report.reported_tcb.hex()}.der"
    (folder / "vcek" / name).write_bytes(real["vcek"])
    return tmp_path / "snp"


def _real_verifier(cache: Path) -> SnpVerifier:
    return SnpVerifier(collateral=SnpCollateralDirectory(cache), allow_missing_crl_insecure=True)


# -- pins -----------------------------------------------------------------------------------------


def test_production_pins_are_the_builtin_arks_and_milan_matches_the_real_chain(
    real: dict[str, bytes],
) -> None:
    for product, pem in AMD_CHAIN_PEM.items():
        ask, ark = amdsev.load_certificates_pem(pem)
        assert amdsev.cert_fingerprint(ark) == AMD_ARK_SHA256[product]
        assert amdsev.cn_of(ark.subject) == f"ARK-{product}"
        amdsev.check_issued_by(ask, ark)
    real_ark = amdsev.load_certificates_pem(real["chain"])[1]
    assert amdsev.cert_fingerprint(real_ark) == SNP_MILAN_ARK_SHA256 == AMD_ARK_SHA256["Milan"]
    assert AMD_ROOTS.sha256 == AMD_ARK_SHA256


# -- the real report ------------------------------------------------------------------------------


def test_the_real_milan_report_verifies_with_the_real_chain(
    real: dict[str, bytes], real_cache: Path
) -> None:
    evidence = detect_evidence(real["report"])
    assert evidence.type == "sev-snp"
    claims = _real_verifier(real_cache).verify(evidence, now=SNP_TIME)
    assert claims.tee == "snp"
    assert claims.snp_product == "Milan"
    assert claims.launch_measurement == SNP_MEASUREMENT == claims.measurement
    assert claims.report_data == SNP_REPORT_DATA
    assert claims.reported_tcb == SNP_REPORTED_TCB
    assert (claims.tcb_bootloader, claims.tcb_tee, claims.tcb_snp, claims.tcb_microcode) == (
        3,
        0,
        8,
        115,
    )
    assert claims.tcb_fmc is None
    assert claims.guest_svn == 0
    assert claims.vmpl == 0
    assert claims.guest_policy == 0x30000
    assert claims.debug is False
    assert claims.platform_info == 1
    assert claims.host_data == "00" * 32
    assert claims.family_id == "00" * 16
    assert claims.chip_id is not None
    assert claims.chip_id.startswith("d49554ec717f4e5b")
    assert claims.snp_signing_key == "vcek"
    # the same with the VCEK in the certificate table instead of the cache
    (real_cache / "Milan" / "vcek").rename(real_cache / "Milan" / "moved")
    with_table = Evidence(
        type="sev-snp", data=real["report"] + build_cert_table({GUID_VCEK: real["vcek"]})
    )
    assert _real_verifier(real_cache).verify(with_table, now=SNP_TIME) == dataclasses.replace(
        claims, evidence_digest=with_table.digest
    )


def test_a_missing_crl_is_refused_unless_explicitly_allowed(
    real: dict[str, bytes], real_cache: Path
) -> None:
    verifier = SnpVerifier(collateral=SnpCollateralDirectory(real_cache))
    with pytest.raises(CollateralError, match="no CRL for Milan"):
        verifier.verify(Evidence(type="sev-snp", data=real["report"]), now=SNP_TIME)


def test_every_flipped_byte_of_the_real_report_is_refused(
    real: dict[str, bytes], real_cache: Path
) -> None:
    """All 1,184 positions: the signed region, r, s and the signature's reserved bytes."""
    verifier = _real_verifier(real_cache)
    report = real["report"]
    verifier.verify(Evidence(type="sev-snp", data=report), now=SNP_TIME)
    amdsev.load_certificate(real["vcek"])
    accepted = []
    for position in range(REPORT_SIZE):
        for flip in (0x01, 0x80):
            damaged = bytearray(report)
            damaged[position] ^= flip
            try:
                verifier.verify(Evidence(type="sev-snp", data=bytes(damaged)), now=SNP_TIME)
            except (EvidenceError, CollateralError):
                pass
            else:
                accepted.append((position, flip))
    assert accepted == []


def test_the_signature_check_alone_refuses_every_flipped_byte(real: dict[str, bytes]) -> None:
    """Not just the parser: the ECDSA check itself fails for every signed byte and every byte
    of r and s."""
    vcek = amdsev.load_certificate(real["vcek"])
    report = parse_report(real["report"])
    amdsev.check_p384_signature(vcek, report.signed_bytes, *report.signature)
    raw = real["report"]
    survivors = []
    for position in range(0x2E8 + 72):
        damaged = bytearray(raw)
        damaged[position] ^= 0x01
        r = int.from_bytes(damaged[0x2A0:0x2E8], "little")
        s = int.from_bytes(damaged[0x2E8:0x330], "little")
        try:
            amdsev.check_p384_signature(vcek, bytes(damaged[:SIGNED_SIZE]), r, s)
        except ValueError:
            continue
        survivors.append(position)
    assert survivors == []


def test_a_vcek_from_another_chip_is_refused(real: dict[str, bytes], real_cache: Path) -> None:
    """A genuine-looking VCEK for another chip (made here, so it cannot chain to AMD either),
    sent with the real report."""
    other = FakeAmd(chip_id=b"\x11" * 64)
    table = build_cert_table({GUID_VCEK: other.vcek.public_bytes(Encoding.DER)})
    with pytest.raises(EvidenceError, match="does not chain to AMD"):
        _real_verifier(real_cache).verify(
            Evidence(type="sev-snp", data=real["report"] + table), now=SNP_TIME
        )


def test_a_chain_ending_in_a_self_made_root_is_refused(
    real: dict[str, bytes], real_cache: Path
) -> None:
    fake = FakeAmd()
    (real_cache / "Milan" / "cert_chain.pem").write_bytes(fake.chain_pem())
    with pytest.raises(EvidenceError, match="does not end at AMD's ARK for Milan"):
        _real_verifier(real_cache).verify(
            Evidence(type="sev-snp", data=real["report"]), now=SNP_TIME
        )
    # and a self-made hierarchy whose own reports verify under its own root is still refused
    # by the production pins
    fake.write_cache(real_cache)
    evidence = Evidence(type="sev-snp", data=fake.evidence(b"\0" * 64))
    with pytest.raises(EvidenceError, match="does not end at AMD's ARK"):
        SnpVerifier(collateral=SnpCollateralDirectory(real_cache)).verify(evidence, now=NOW)


def test_real_report_policy_decisions(real: dict[str, bytes], real_cache: Path) -> None:
    claims = _real_verifier(real_cache).verify(
        Evidence(type="sev-snp", data=real["report"]), now=SNP_TIME
    )
    pinned = {
        "allowed_tees": ["snp"],
        "snp": {
            "measurement": [SNP_MEASUREMENT],
            "min_tcb": {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115},
            "allow_smt": True,
        },
    }
    assert Policy.from_dict(pinned).evaluate(claims, now=SNP_TIME).allowed
    strict = Policy.from_dict({**pinned, "snp": {"measurement": [SNP_MEASUREMENT]}})
    assert strict.evaluate(claims, now=SNP_TIME).reasons == ("smt_not_allowed",)
    higher = {**pinned["snp"], "min_tcb": {"microcode": 116, "snp": 9}}  # type: ignore[dict-item]
    decision = Policy.from_dict({**pinned, "snp": higher}).evaluate(claims, now=SNP_TIME)
    assert decision.reasons == ("tcb_below_minimum",)
    assert "microcode 115 < 116" in decision.message
    assert "snp 8 < 9" in decision.message
    other = {**pinned["snp"], "measurement": ["00" * 48]}
    decision = Policy.from_dict({**pinned, "snp": other}).evaluate(claims, now=SNP_TIME)
    assert decision.reasons == ("measurement_mismatch",)
    # report data that does not bind this release's nonce and key
    expected = report_data_for(nonce=b"n" * 32, hpke_suite="x25519", public_key=b"k" * 32)
    decision = Policy.from_dict(pinned).evaluate(
        claims, now=SNP_TIME, expected_report_data=expected
    )
    assert decision.reasons == ("binding_mismatch",)
    assert (
        Policy.from_dict(pinned)
        .evaluate(claims, now=SNP_TIME, expected_report_data=SNP_REPORT_DATA)
        .allowed
    )


# -- the test hierarchy: rules the real sample cannot show ---------------------------------------


@pytest.fixture(scope="module")
def amd() -> FakeAmd:
    return FakeAmd()


def _verifier(amd: FakeAmd, cache: Path) -> SnpVerifier:
    return SnpVerifier(collateral=SnpCollateralDirectory(cache), roots=amd.roots)


def test_test_hierarchy_round_trip_and_cache_only_vcek(amd: FakeAmd, tmp_path: Path) -> None:
    cache = amd.write_cache(tmp_path / "snp", vcek=True)
    verifier = _verifier(amd, cache)
    claims = verifier.verify(Evidence(type="sev-snp", data=amd.evidence(b"\7" * 64)), now=NOW)
    assert claims.report_data == b"\7" * 64
    assert claims.guest_svn == 1
    assert claims.collateral_next_update == NOW - timedelta(days=9) + timedelta(days=30)
    bare = verifier.verify(Evidence(type="sev-snp", data=amd.report(b"\7" * 64)), now=NOW)
    assert bare.launch_measurement == claims.launch_measurement


def test_stale_and_future_crl_and_revocation(amd: FakeAmd, tmp_path: Path) -> None:
    cache = amd.write_cache(tmp_path / "snp")
    evidence = Evidence(type="sev-snp", data=amd.evidence(b"\0" * 64))
    verifier = _verifier(amd, cache)
    with pytest.raises(CollateralError) as stale:
        verifier.verify(evidence, now=NOW + timedelta(days=60))
    assert stale.value.stale
    amd.write_cache(cache, crl=amd.crl(revoked=(amd.ask.serial_number,)))
    with pytest.raises(EvidenceError, match="CRL revokes the ASK"):
        verifier.verify(evidence, now=NOW)
    amd.write_cache(cache, crl=amd.crl(revoked=(amd.vcek.serial_number,)))
    with pytest.raises(EvidenceError, match="CRL revokes the VCEK"):
        verifier.verify(evidence, now=NOW)
    other = FakeAmd()
    amd.write_cache(cache, crl=amd.crl(signer=other.ark_key))
    with pytest.raises(CollateralError, match="CRL does not verify"):
        verifier.verify(evidence, now=NOW)
    amd.write_cache(cache)
    assert verifier.verify(evidence, now=NOW).tee == "snp"


def test_vcek_for_another_chip_or_tcb_is_refused(amd: FakeAmd, tmp_path: Path) -> None:
    verifier = _verifier(amd, amd.write_cache(tmp_path / "snp"))
    report = amd.report(b"\0" * 64)
    other_chip = amd.make_vcek(chip_id=b"\x22" * 64)
    with pytest.raises(EvidenceError, match="belongs to another chip"):
        verifier.verify(Evidence(type="sev-snp", data=report + amd.cert_table(other_chip)), now=NOW)
    other_tcb = amd.make_vcek(tcb=bytes([3, 0, 0, 0, 0, 0, 9, 0x73]))
    with pytest.raises(EvidenceError, match="snp SPL 9"):
        verifier.verify(Evidence(type="sev-snp", data=report + amd.cert_table(other_tcb)), now=NOW)
    # a VCEK of the right chip and TCB but another key (a forged certificate for it)
    from cryptography.hazmat.primitives.asymmetric import ec

    wrong_key = amd.make_vcek(key=ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(EvidenceError, match="signature does not verify"):
        verifier.verify(Evidence(type="sev-snp", data=report + amd.cert_table(wrong_key)), now=NOW)


def test_reports_signed_for_the_wrong_product_family_or_vlek_without_cert(
    amd: FakeAmd, tmp_path: Path
) -> None:
    verifier = _verifier(amd, amd.write_cache(tmp_path / "snp"))
    v3 = amd.report(b"\0" * 64, version=3)
    assert (
        verifier.verify(Evidence(type="sev-snp", data=v3 + amd.cert_table()), now=NOW).tee == "snp"
    )
    vlek = amd.report(b"\0" * 64, signing_key=1)
    with pytest.raises(EvidenceError, match="host sent no VLEK"):
        verifier.verify(Evidence(type="sev-snp", data=vlek + amd.cert_table()), now=NOW)


def test_turin_tcb_layout(tmp_path: Path) -> None:
    turin = FakeAmd(product="Turin", tcb=bytes([1, 2, 3, 4, 0, 0, 0, 0x20]))
    verifier = _verifier(turin, turin.write_cache(tmp_path / "snp"))
    claims = verifier.verify(
        Evidence(type="sev-snp", data=turin.evidence(b"\0" * 64, version=3)), now=NOW
    )
    assert (claims.tcb_fmc, claims.tcb_bootloader, claims.tcb_tee, claims.tcb_snp) == (1, 2, 3, 4)
    assert claims.tcb_microcode == 0x20
    assert claims.snp_product == "Turin"


def test_debug_report_refused_by_default_policy(amd: FakeAmd, tmp_path: Path) -> None:
    verifier = _verifier(amd, amd.write_cache(tmp_path / "snp"))
    debug = 0x30000 | (1 << 19) | (1 << 18)
    claims = verifier.verify(
        Evidence(type="sev-snp", data=amd.evidence(b"\0" * 64, policy=debug, vmpl=2)), now=NOW
    )
    assert claims.debug
    policy = Policy.from_dict(
        {"allowed_tees": ["snp"], "snp": {"measurement": [claims.launch_measurement]}}
    )
    decision = policy.evaluate(claims, now=NOW)
    assert decision.reasons == ("migration_agent_not_allowed", "vmpl_mismatch", "debug_enclave")
    relaxed = Policy.from_dict(
        {
            "allowed_tees": ["snp"],
            "snp": {
                "measurement": [claims.launch_measurement],
                "allow_migration_agent": True,
                "vmpl": 2,
            },
            "allow_debug_enclave_insecure": True,
        }
    )
    assert relaxed.evaluate(claims, now=NOW).allowed


def test_id_block_and_author_key_pins(amd: FakeAmd, tmp_path: Path) -> None:
    verifier = _verifier(amd, amd.write_cache(tmp_path / "snp"))
    claims = verifier.verify(Evidence(type="sev-snp", data=amd.evidence(b"\0" * 64)), now=NOW)
    base = {"measurement": [claims.launch_measurement]}
    cases = {
        "host_data": ("host_data_mismatch", "cd" * 32),
        "family_id": ("family_id_mismatch", "01" * 16),
        "image_id": ("image_id_mismatch", "01" * 16),
        "id_key_digest": ("id_key_mismatch", "01" * 48),
        "author_key_digest": ("author_key_mismatch", "00" * 48),
    }
    for name, (code, value) in cases.items():
        policy = Policy.from_dict({"allowed_tees": ["snp"], "snp": {**base, name: [value]}})
        assert policy.evaluate(claims, now=NOW).reasons == (code,), name
    ok = Policy.from_dict(
        {
            "allowed_tees": ["snp"],
            "snp": {**base, "host_data": ["ab" * 32], "min_guest_svn": 1, "products": ["Milan"]},
        }
    )
    assert ok.evaluate(claims, now=NOW).allowed
    svn = Policy.from_dict({"allowed_tees": ["snp"], "snp": {**base, "min_guest_svn": 2}})
    assert svn.evaluate(claims, now=NOW).reasons == ("guest_svn_too_low",)
    genoa = Policy.from_dict({"allowed_tees": ["snp"], "snp": {**base, "products": ["Genoa"]}})
    assert genoa.evaluate(claims, now=NOW).reasons == ("product_not_allowed",)


def test_policy_requires_a_measurement_pin_for_snp() -> None:
    from sealtorch.errors import PolicyError

    with pytest.raises(PolicyError, match="needs measurement"):
        Policy.from_dict({"allowed_tees": ["snp"], "snp": {"host_data": ["00" * 32]}})
    with pytest.raises(PolicyError, match=r"snp\.measurement"):
        Policy.from_dict({"allowed_tees": ["snp"], "snp": {"measurement": ["12"]}})


def test_missing_collateral_is_collateral_unavailable(amd: FakeAmd, tmp_path: Path) -> None:
    verifier = _verifier(amd, tmp_path / "empty")
    with pytest.raises(CollateralError, match="no SNP certificate chain for Milan"):
        verifier.verify(Evidence(type="sev-snp", data=amd.evidence(b"\0" * 64)), now=NOW)
    with pytest.raises(CollateralError, match="no VCEK for chip"):
        verifier.verify(Evidence(type="sev-snp", data=amd.report(b"\0" * 64)), now=NOW)


def test_parser_refuses_unknown_versions_and_reserved_bits(real: dict[str, bytes]) -> None:
    import struct

    def with_u32(offset: int, value: int) -> bytes:
        raw = bytearray(real["report"])
        struct.pack_into("<I", raw, offset, value)
        return bytes(raw)

    for version in (0, 1, 6, 0xFFFFFFFF):
        with pytest.raises(EvidenceError, match="unknown SNP report version"):
            parse_report(with_u32(0, version))
    with pytest.raises(EvidenceError, match="signature algorithm"):
        parse_report(with_u32(0x34, 2))
    with pytest.raises(EvidenceError, match="reserved bits"):
        parse_report(with_u32(0x08, 0x10000))  # bit 17 must be one
    with pytest.raises(EvidenceError, match="non-zero reserved"):
        parse_report(with_u32(0x1F8, 1))
    with pytest.raises(EvidenceError, match="not signed by a VCEK or VLEK"):
        parse_report(with_u32(0x48, 7 << 2))
    with pytest.raises(EvidenceError, match=r"1184 bytes"):
        parse_report(real["report"][:-1])
    assert hashlib.sha256(real["report"]).hexdigest()  # the sample itself parses
    assert parse_report(real["report"]).version == 2


def test_evidence_detection_keeps_dcap_and_snp_apart(
    attestation_samples: Path, real: dict[str, bytes], tmp_path: Path
) -> None:
    assert detect_evidence((attestation_samples / "sgx_quote").read_bytes()).type == "sgx-dcap"
    assert detect_evidence(real["report"].hex().encode()).type == "sev-snp"
    shutil.copy(attestation_samples / "snp" / "report_milan.hex", tmp_path / "r.hex")
    assert detect_evidence((tmp_path / "r.hex").read_bytes()).data == real["report"]


def test_vlek_signed_reports_use_the_vlek_chain(tmp_path: Path) -> None:
    """A VLEK (cloud-provider key) report: the VLEK comes with the report and chains through
    the ASVK (``SEV-VLEK-Milan``) to the same ARK; there is no chip id to match."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding

    amd = FakeAmd()
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
    asvk = (
        x509.CertificateBuilder()
        .subject_name(x509.Name.from_rfc4514_string("CN=SEV-VLEK-Milan"))
        .issuer_name(amd.ark.subject)
        .public_key(amd.ask_key.public_key())
        .serial_number(7)
        .not_valid_before(amd.ark.not_valid_before_utc)
        .not_valid_after(amd.ark.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(amd.ark_key, hashes.SHA384(), rsa_padding=pss)
    )
    vlek_key = ec.generate_private_key(ec.SECP384R1())
    vlek = (
        x509.CertificateBuilder()
        .subject_name(x509.Name.from_rfc4514_string("CN=SEV-VLEK"))
        .issuer_name(asvk.subject)
        .public_key(vlek_key.public_key())
        .serial_number(8)
        .not_valid_before(amd.ark.not_valid_before_utc)
        .not_valid_after(amd.ark.not_valid_after_utc)
        .sign(amd.ask_key, hashes.SHA384(), rsa_padding=pss)
    )
    cache = amd.write_cache(tmp_path / "snp")
    folder = cache / "Milan"
    (folder / "vlek_cert_chain.pem").write_bytes(
        asvk.public_bytes(Encoding.PEM) + amd.ark.public_bytes(Encoding.PEM)
    )
    verifier = _verifier(amd, cache)
    report = amd.report(b"\3" * 64, signing_key=1, key=vlek_key)
    evidence = Evidence(type="sev-snp", data=report + amd.cert_table(vlek, vlek=True))
    with pytest.raises(CollateralError, match="no CRL for Milan"):
        verifier.verify(evidence, now=NOW)
    (folder / "vlek_crl.der").write_bytes(amd.crl())
    claims = verifier.verify(evidence, now=NOW)
    assert claims.snp_signing_key == "vlek"
    assert claims.report_data == b"\3" * 64
    # the VCEK chain does not vouch for a VLEK, nor the VLEK for a VCEK-signed report
    vcek_labelled = amd.report(b"\3" * 64, signing_key=0, key=vlek_key)
    with pytest.raises(EvidenceError):
        verifier.verify(
            Evidence(type="sev-snp", data=vcek_labelled + amd.cert_table(vlek)), now=NOW
        )
