"""The SEV-SNP attester against fake device trees shaped like the real ones: configfs-tsm
(provider sev_guest, inblob/outblob/auxblob) and /dev/sev-guest (SNP_GET_EXT_REPORT)."""

from __future__ import annotations

from pathlib import Path

import pytest

from _fixtures.snp import NOW, FakeAmd, FakeSevGuest, FakeSnpTsm
from sealtorch.attestation import (
    SnpAttester,
    SnpCollateralDirectory,
    SnpVerifier,
    attester_for,
)
from sealtorch.attestation.snp_report import REPORT_SIZE, parse_cert_table
from sealtorch.errors import EvidenceError

DATA = bytes(range(64))


@pytest.fixture(scope="module")
def amd() -> FakeAmd:
    return FakeAmd()


@pytest.fixture
def tsm_root(tmp_path: Path) -> Path:
    root = tmp_path / "tsm" / "report"
    root.mkdir(parents=True)
    return root


def test_configfs_tsm_round_trip_verifies(amd: FakeAmd, tsm_root: Path, tmp_path: Path) -> None:
    evidence = FakeSnpTsm(tsm_root, amd).evidence(DATA)
    assert evidence.type == "sev-snp"
    assert len(parse_cert_table(evidence.data[REPORT_SIZE:])) == 1
    assert list(tsm_root.iterdir()) == []  # the entry was removed
    cache = amd.write_cache(tmp_path / "snp")
    claims = SnpVerifier(collateral=SnpCollateralDirectory(cache), roots=amd.roots).verify(
        evidence, now=NOW
    )
    assert claims.report_data == DATA


def test_configfs_tsm_without_host_certificates(amd: FakeAmd, tsm_root: Path) -> None:
    evidence = FakeSnpTsm(tsm_root, amd, aux=False).evidence(DATA)
    assert len(evidence.data) == REPORT_SIZE


def test_configfs_tsm_other_provider(amd: FakeAmd, tsm_root: Path) -> None:
    with pytest.raises(EvidenceError, match="'tdx_guest', not 'sev_guest'"):
        FakeSnpTsm(tsm_root, amd, provider="tdx_guest").evidence(DATA)
    assert list(tsm_root.iterdir()) == []


def test_report_for_other_report_data_is_refused(amd: FakeAmd, tsm_root: Path) -> None:
    class Stale(FakeSnpTsm):
        def read_attribute(self, path: Path, limit: int) -> bytes:
            if path.name == "outblob":
                return self.amd.report(b"\1" * 64)
            return super().read_attribute(path, limit)

    with pytest.raises(EvidenceError, match="different report_data"):
        Stale(tsm_root, amd).evidence(DATA)


def test_garbage_outblob_is_refused(amd: FakeAmd, tsm_root: Path) -> None:
    class Garbage(FakeSnpTsm):
        def read_attribute(self, path: Path, limit: int) -> bytes:
            if path.name == "outblob":
                return b"\2" * REPORT_SIZE
            return super().read_attribute(path, limit)

    with pytest.raises(EvidenceError, match="no valid SNP report"):
        Garbage(tsm_root, amd).evidence(DATA)


def test_sev_guest_device_fallback(amd: FakeAmd, tmp_path: Path) -> None:
    device = tmp_path / "sev-guest"
    device.write_bytes(b"")
    attester = FakeSevGuest(device, amd)
    evidence = attester.evidence(DATA)
    assert evidence.data[:0x2A0] == amd.report(DATA)[:0x2A0]  # the signed part
    assert len(parse_cert_table(evidence.data[REPORT_SIZE:])) == 1
    assert attester.calls == 1
    # the driver asks for a larger certificate buffer first
    bigger = FakeSevGuest(device, amd, need_pages=8)
    assert bigger.evidence(DATA).data[0x50:0x90] == DATA
    assert bigger.calls == 2
    with pytest.raises(EvidenceError, match="status 0x16"):
        FakeSevGuest(device, amd, status=0x16).evidence(DATA)


def test_real_ioctl_on_a_file_that_is_not_the_device(tmp_path: Path) -> None:
    device = tmp_path / "sev-guest"
    device.write_bytes(b"")
    with pytest.raises(EvidenceError, match="not the SEV-SNP guest device"):
        SnpAttester(root=tmp_path / "no-configfs", device=device).evidence(DATA)


def test_absent(tmp_path: Path) -> None:
    with pytest.raises(EvidenceError, match="not an SEV-SNP guest"):
        SnpAttester(root=tmp_path / "a", device=tmp_path / "b").evidence(DATA)
    with pytest.raises(EvidenceError, match="exactly 64 bytes"):
        SnpAttester(root=tmp_path / "a", device=tmp_path / "b").evidence(b"x")


def test_attester_for_snp(tmp_path: Path) -> None:
    attester = attester_for("snp", root=tmp_path)
    assert isinstance(attester, SnpAttester)
    assert attester.evidence_type == "sev-snp"
