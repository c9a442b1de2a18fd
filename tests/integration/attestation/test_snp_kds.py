"""`fetch_from_kds` / `attest fetch-collateral` against a fake AMD KDS on a real socket."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.serialization import Encoding

from _fixtures.httpfake import serve_http
from _fixtures.snp import NOW, FakeAmd
from sealtorch.attestation import (
    Evidence,
    SnpCollateralDirectory,
    SnpVerifier,
    fetch_from_kds,
)
from sealtorch.attestation.snp_collateral import vcek_query
from sealtorch.attestation.snp_report import parse_report
from sealtorch.cli import cli
from sealtorch.errors import CollateralError


@dataclass
class FakeKds:
    """Serves /vcek/v1/{product}/cert_chain, /crl and /{hwid}?... like AMD KDS."""

    files: dict[str, bytes]
    url: str = ""
    hits: list[str] = field(default_factory=list)

    def respond(self, target: str) -> tuple[int, dict[str, str], bytes]:
        self.hits.append(target)
        body = self.files.get(target)
        return (200, {}, body) if body is not None else (404, {}, b"not found")


@pytest.fixture
def kds() -> Iterator[FakeKds]:
    fake = FakeKds(files={})

    with serve_http(fake.respond) as url:
        fake.url = url
        yield fake


def _serve(kds: FakeKds, amd: FakeAmd, report: bytes, *, crl: bytes | None = None) -> None:
    kds.files = {
        "/vcek/v1/Milan/cert_chain": amd.chain_pem(),
        "/vcek/v1/Milan/crl": crl if crl is not None else amd.crl(),
        vcek_query("Milan", parse_report(report)): amd.vcek.public_bytes(Encoding.DER),
    }


def test_fetch_fills_the_cache_and_the_verifier_uses_it_offline(
    kds: FakeKds, tmp_path: Path
) -> None:
    amd = FakeAmd()
    report = amd.report(b"\5" * 64)
    _serve(kds, amd, report)
    written = fetch_from_kds(
        tmp_path / "snp",
        product="Milan",
        report=parse_report(report),
        base_url=kds.url,
        roots=amd.roots,
    )
    assert sorted(path.name for path in written) == sorted(
        ["cert_chain.pem", "crl.der", f"{amd.chip_id.hex()}-{amd.tcb.hex()}.der"]
    )
    assert len(kds.hits) == 3
    assert "blSPL=3" in kds.hits[2]
    assert "ucodeSPL=115" in kds.hits[2]
    kds.files = {}  # KDS gone: verification never needs it
    verifier = SnpVerifier(collateral=SnpCollateralDirectory(tmp_path / "snp"), roots=amd.roots)
    claims = verifier.verify(Evidence(type="sev-snp", data=report), now=NOW)
    assert claims.report_data == b"\5" * 64


def test_fetch_checks_everything_before_writing(kds: FakeKds, tmp_path: Path) -> None:
    amd = FakeAmd()
    report = amd.report(b"\5" * 64)
    _serve(kds, amd, report)
    # AMD's pins refuse the test root
    with pytest.raises(CollateralError, match="does not end at AMD's ARK for Milan"):
        fetch_from_kds(tmp_path, product="Milan", report=parse_report(report), base_url=kds.url)
    # a CRL signed by someone else
    _serve(kds, amd, report, crl=amd.crl(signer=FakeAmd().ark_key))
    with pytest.raises(CollateralError, match="not signed by ARK-Milan"):
        fetch_from_kds(
            tmp_path, product="Milan", report=parse_report(report), base_url=kds.url,
            roots=amd.roots,
        )  # fmt: skip
    # a missing document
    kds.files.pop("/vcek/v1/Milan/crl")
    with pytest.raises(CollateralError, match="HTTP 404"):
        fetch_from_kds(tmp_path, product="Milan", base_url=kds.url, roots=amd.roots)
    assert list(tmp_path.iterdir()) == []


def test_cli_fetch_with_the_real_milan_chain_refuses_a_forged_crl(
    kds: FakeKds, tmp_path: Path, attestation_samples: Path
) -> None:
    """AMD's real chain and the real VCEK (the pin matches) but a CRL AMD did not sign."""
    snp = attestation_samples / "snp"
    report_hex = (snp / "report_milan.hex").read_text().strip()
    report = bytes.fromhex(report_hex)
    kds.files = {
        "/vcek/v1/Milan/cert_chain": (snp / "cert_chain_milan").read_bytes(),
        "/vcek/v1/Milan/crl": FakeAmd().crl(),
        vcek_query("Milan", parse_report(report)): (snp / "vcek_milan.der").read_bytes(),
    }
    result = CliRunner().invoke(
        cli,
        [
            "attest", "fetch-collateral", str(snp / "report_milan.hex"), "--product", "Milan",
            "--amd-kds-url", kds.url, "--cache-dir", str(tmp_path),
        ],
    )  # fmt: skip
    assert result.exit_code != 0
    assert "does not verify" in result.output
    assert "the CRL's issuer (" in result.output
    assert not (tmp_path / "snp").exists()
