"""Gramine and TDX evidence providers against fake device directories shaped like the real ones."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest
from attest_facts import SGX_REPORT_DATA, TDX_REPORT_DATA

from sealtorch.attestation import (
    EvidenceProvider,
    GramineAttester,
    SimAttester,
    TdxAttester,
    attester_for,
)
from sealtorch.errors import ConfigError, EvidenceError

# -- Gramine: /dev/attestation --------------------------------------------------------------------


@pytest.fixture
def gramine_root(tmp_path: Path, attestation_samples: Path) -> Path:
    root = tmp_path / "dev-attestation"
    root.mkdir()
    (root / "attestation_type").write_text("dcap\n")
    (root / "user_report_data").write_bytes(b"\0" * 64)
    (root / "quote").write_bytes((attestation_samples / "sgx_quote").read_bytes())
    return root


def test_gramine_writes_report_data_and_reads_the_quote(
    gramine_root: Path, attestation_samples: Path
) -> None:
    attester = GramineAttester(root=gramine_root)
    assert isinstance(attester, EvidenceProvider)
    evidence = attester.evidence(SGX_REPORT_DATA)
    assert evidence.type == "sgx-dcap"
    assert evidence.data == (attestation_samples / "sgx_quote").read_bytes()
    assert (gramine_root / "user_report_data").read_bytes() == SGX_REPORT_DATA


def test_gramine_absent(tmp_path: Path) -> None:
    with pytest.raises(EvidenceError, match="not running inside Gramine-SGX"):
        GramineAttester(root=tmp_path / "missing").evidence(SGX_REPORT_DATA)


@pytest.mark.parametrize("kind", ["none", "epid", ""])
def test_gramine_wrong_attestation_type(gramine_root: Path, kind: str) -> None:
    (gramine_root / "attestation_type").write_text(kind)
    with pytest.raises(EvidenceError, match=re.escape('sgx.remote_attestation = "dcap"')):
        GramineAttester(root=gramine_root).evidence(SGX_REPORT_DATA)


@pytest.mark.parametrize("missing", ["attestation_type", "quote"])
def test_gramine_missing_files(gramine_root: Path, missing: str) -> None:
    (gramine_root / missing).unlink()
    with pytest.raises(EvidenceError, match=f"{missing} is missing"):
        GramineAttester(root=gramine_root).evidence(SGX_REPORT_DATA)


def test_gramine_refuses_a_quote_for_other_report_data(gramine_root: Path) -> None:
    with pytest.raises(EvidenceError, match="different report_data"):
        GramineAttester(root=gramine_root).evidence(b"\1" * 64)


def test_gramine_refuses_garbage_and_empty_quotes(gramine_root: Path) -> None:
    (gramine_root / "quote").write_bytes(b"")
    with pytest.raises(EvidenceError, match="empty"):
        GramineAttester(root=gramine_root).evidence(SGX_REPORT_DATA)
    (gramine_root / "quote").write_bytes(b"\3\0" + b"\0" * 100)
    with pytest.raises(EvidenceError, match="not a DCAP quote"):
        GramineAttester(root=gramine_root).evidence(SGX_REPORT_DATA)


def test_gramine_refuses_a_tdx_quote(gramine_root: Path, attestation_samples: Path) -> None:
    (gramine_root / "quote").write_bytes((attestation_samples / "tdx_quote").read_bytes())
    with pytest.raises(EvidenceError, match="returned a TDX quote, expected SGX"):
        GramineAttester(root=gramine_root).evidence(TDX_REPORT_DATA)


def test_gramine_report_data_size(gramine_root: Path) -> None:
    with pytest.raises(EvidenceError, match="exactly 64 bytes"):
        GramineAttester(root=gramine_root).evidence(b"short")


# -- TDX: configfs-tsm ----------------------------------------------------------------------------


class FakeTsm(TdxAttester):
    """What the kernel does on mkdir/rmdir of a report entry, over a plain directory."""

    def __init__(
        self,
        root: Path,
        quote: bytes,
        *,
        provider: str = "tdx_guest",
        racing: bool = False,
        refuse_mkdir: int | None = None,
        omit: tuple[str, ...] = (),
    ) -> None:
        super().__init__(root=root)
        self.quote = quote
        self.provider = provider
        self.racing = racing
        self.refuse_mkdir = refuse_mkdir
        self.omit = omit
        self.created: list[Path] = []

    def create_entry(self, entry: Path) -> None:
        if self.refuse_mkdir is not None:
            raise OSError(self.refuse_mkdir, "refused")
        super().create_entry(entry)
        self.created.append(entry)
        files = {"provider": self.provider.encode() + b"\n", "generation": b"0\n"}
        files["outblob"] = self.quote
        for name, content in files.items():
            if name not in self.omit:
                (entry / name).write_bytes(content)

    def read_attribute(self, path: Path, limit: int) -> bytes:
        if self.racing and path.name == "generation":
            # another writer bumps the generation between every two reads
            value = int(path.read_bytes()) + 1
            path.write_bytes(f"{value}\n".encode())
        return super().read_attribute(path, limit)

    def remove_entry(self, entry: Path) -> None:
        for child in entry.iterdir():
            child.unlink()
        super().remove_entry(entry)


@pytest.fixture
def tsm_root(tmp_path: Path) -> Path:
    root = tmp_path / "tsm" / "report"
    root.mkdir(parents=True)
    return root


@pytest.fixture
def tdx_quote(attestation_samples: Path) -> bytes:
    return (attestation_samples / "tdx_quote").read_bytes()


def test_tdx_round_trip_and_cleanup(tsm_root: Path, tdx_quote: bytes) -> None:
    attester = FakeTsm(tsm_root, tdx_quote)
    evidence = attester.evidence(TDX_REPORT_DATA)
    assert evidence.type == "tdx-dcap"
    assert evidence.data == tdx_quote
    assert len(attester.created) == 1
    assert attester.created[0].parent == tsm_root
    assert list(tsm_root.iterdir()) == []  # the entry was removed


def test_tdx_absent(tmp_path: Path) -> None:
    with pytest.raises(EvidenceError, match="configfs-tsm is not available"):
        TdxAttester(root=tmp_path / "missing").evidence(TDX_REPORT_DATA)


def test_tdx_other_provider(tsm_root: Path, tdx_quote: bytes) -> None:
    with pytest.raises(EvidenceError, match="'sev_guest', not 'tdx_guest'"):
        FakeTsm(tsm_root, tdx_quote, provider="sev_guest").evidence(TDX_REPORT_DATA)
    assert list(tsm_root.iterdir()) == []


@pytest.mark.parametrize("missing", ["provider", "outblob", "generation"])
def test_tdx_missing_files(tsm_root: Path, tdx_quote: bytes, missing: str) -> None:
    with pytest.raises(EvidenceError, match=f"{missing} is missing"):
        FakeTsm(tsm_root, tdx_quote, omit=(missing,)).evidence(TDX_REPORT_DATA)
    assert list(tsm_root.iterdir()) == []


def test_tdx_kernel_refuses_the_entry(tsm_root: Path, tdx_quote: bytes) -> None:
    with pytest.raises(EvidenceError, match=r"refused to create a report entry.*permission"):
        FakeTsm(tsm_root, tdx_quote, refuse_mkdir=errno.EACCES).evidence(TDX_REPORT_DATA)
    with pytest.raises(EvidenceError, match="refused to create"):
        FakeTsm(tsm_root, tdx_quote, refuse_mkdir=errno.EBUSY).evidence(TDX_REPORT_DATA)


def test_tdx_racing_writer_is_detected(tsm_root: Path, tdx_quote: bytes) -> None:
    with pytest.raises(EvidenceError, match="another process kept writing"):
        FakeTsm(tsm_root, tdx_quote, racing=True).evidence(TDX_REPORT_DATA)
    assert list(tsm_root.iterdir()) == []


def test_tdx_checks_the_quote(tsm_root: Path, tdx_quote: bytes, attestation_samples: Path) -> None:
    with pytest.raises(EvidenceError, match="different report_data"):
        FakeTsm(tsm_root, tdx_quote).evidence(SGX_REPORT_DATA)
    sgx = (attestation_samples / "sgx_quote").read_bytes()
    with pytest.raises(EvidenceError, match="returned a SGX quote, expected TDX"):
        FakeTsm(tsm_root, sgx).evidence(SGX_REPORT_DATA)
    with pytest.raises(EvidenceError, match="empty"):
        FakeTsm(tsm_root, b"").evidence(TDX_REPORT_DATA)


def test_real_tdx_attester_writes_inblob_into_a_fresh_entry(tsm_root: Path) -> None:
    """Without the fake kernel, the plain attester creates an entry, writes inblob, and fails
    clearly because nothing produced the attribute files."""
    with pytest.raises(EvidenceError, match="provider is missing"):
        TdxAttester(root=tsm_root).evidence(TDX_REPORT_DATA)
    leftovers = list(tsm_root.iterdir())
    assert leftovers == []


# -- factory --------------------------------------------------------------------------------------


def test_attester_for(tmp_path: Path) -> None:
    assert isinstance(attester_for("gramine", root=tmp_path), GramineAttester)
    assert isinstance(attester_for("tdx", root=tmp_path), TdxAttester)
    sim = attester_for("sim", role="keycache", key_path=tmp_path / "k", root=None)
    assert isinstance(sim, SimAttester)
    assert sim.evidence_type == "sim"
    assert isinstance(attester_for("gramine", root=None), GramineAttester)
    with pytest.raises(ConfigError, match="unknown TEE 'sev'"):
        attester_for("sev")
    with pytest.raises(ConfigError, match="invalid option for the gramine attester"):
        attester_for("gramine", role="serve")
