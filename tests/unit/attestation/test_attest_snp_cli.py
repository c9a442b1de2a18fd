"""`sealtorch attest verify` / `fetch-collateral` with AMD's real SEV-SNP Milan report."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from attest_facts import SNP_MEASUREMENT, SNP_TIME
from click.testing import CliRunner, Result

from sealtorch.attestation.snp_report import parse_report
from sealtorch.cli import cli

AT = str(int(SNP_TIME.timestamp()))


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, ["attest", *args])


@pytest.fixture
def collateral(tmp_path: Path, attestation_samples: Path) -> Path:
    """A collateral directory as an operator fills it: snp/Milan/cert_chain.pem and the VCEK."""
    snp = attestation_samples / "snp"
    report = parse_report(bytes.fromhex((snp / "report_milan.hex").read_text().strip()))
    folder = tmp_path / "collateral" / "snp" / "Milan"
    (folder / "vcek").mkdir(parents=True)
    (folder / "cert_chain.pem").write_bytes((snp / "cert_chain_milan").read_bytes())
    name = f"{report.chip_id.hex()}-{report.reported_tcb.hex()}.der"
    (folder / "vcek" / name).write_bytes((snp / "vcek_milan.der").read_bytes())
    return tmp_path / "collateral"


def _policy(tmp_path: Path, **snp: object) -> Path:
    doc = {"allowed_tees": ["snp"], "snp": {"measurement": [SNP_MEASUREMENT], **snp}}
    path = tmp_path / "snp.json"
    path.write_text(json.dumps(doc))
    return path


def test_verify_decides_the_real_milan_report(
    tmp_path: Path, attestation_samples: Path, collateral: Path
) -> None:
    report = str(attestation_samples / "snp" / "report_milan.hex")
    common = ["verify", report, "--collateral-dir", str(collateral), "--at", AT]
    pinned = _policy(
        tmp_path, allow_smt=True, min_tcb={"bootloader": 3, "snp": 8, "microcode": 115}
    )
    allowed = run(*common, "--allow-missing-crl-insecure", "--policy", str(pinned), "--json")
    assert allowed.exit_code == 0, allowed.output
    out = json.loads(allowed.output)
    assert out["decision"]["allowed"] is True
    assert out["claims"]["launch_measurement"] == SNP_MEASUREMENT
    assert out["claims"]["tcb_microcode"] == 115
    # refused with the right reason codes
    strict = _policy(tmp_path, min_tcb={"microcode": 200})
    refused = run(*common, "--allow-missing-crl-insecure", "--policy", str(strict))
    assert refused.exit_code == 1
    assert "REFUSED: tcb_below_minimum, smt_not_allowed" in refused.output
    # without AMD's CRL in the collateral, and no explicit opt-out: refused
    no_crl = run(*common, "--policy", str(pinned))
    assert no_crl.exit_code == 1
    assert "REFUSED: collateral_unavailable" in no_crl.output
    assert "no CRL for Milan" in no_crl.output


def test_verify_without_collateral_says_what_to_pass(attestation_samples: Path) -> None:
    result = run("verify", str(attestation_samples / "snp" / "report_milan.hex"))
    assert result.exit_code == 2
    assert "sev-snp evidence: pass --collateral-dir" in result.output


def test_fetch_collateral_fails_in_one_line_where_kds_is_unreachable(
    tmp_path: Path, attestation_samples: Path
) -> None:
    with socket.socket() as probe:  # a port where nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run(
        "fetch-collateral",
        str(attestation_samples / "snp" / "report_milan.hex"),
        "--product",
        "Milan",
        "--amd-kds-url",
        f"http://127.0.0.1:{port}",
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert f"cannot reach AMD KDS at http://127.0.0.1:{port}" in lines[0]
    assert not (tmp_path / "cache" / "snp" / "Milan").exists()


def test_fetch_collateral_needs_a_product_for_a_bare_v2_report(
    tmp_path: Path, attestation_samples: Path
) -> None:
    result = run(
        "fetch-collateral",
        str(attestation_samples / "snp" / "report_milan.hex"),
        "--cache-dir",
        str(tmp_path),
    )
    assert result.exit_code != 0
    assert "pass --product" in result.output


def test_measure_prints_a_policy_section_that_accepts_the_report(
    tmp_path: Path, attestation_samples: Path, collateral: Path
) -> None:
    import yaml

    report = str(attestation_samples / "snp" / "report_milan.hex")
    measured = run("measure", "--snp-report", report, "--product", "Milan")
    assert measured.exit_code == 0, measured.output
    section = yaml.safe_load(measured.output)["snp"]
    assert section["measurement"] == [SNP_MEASUREMENT]
    assert section["min_tcb"] == {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}
    policy = tmp_path / "measured.yaml"
    policy.write_text(yaml.safe_dump({"allowed_tees": ["snp"], "snp": section}))
    verified = run(
        "verify", report, "--collateral-dir", str(collateral), "--at", AT,
        "--allow-missing-crl-insecure", "--policy", str(policy),
    )  # fmt: skip
    assert verified.exit_code == 0, verified.output
    assert "ALLOWED" in verified.output
    bare = run("measure", "--snp-report", report)
    assert bare.exit_code == 2
    assert "pass --product" in bare.output
    wrong = run("measure", "--snp-report", str(attestation_samples / "sgx_quote"))
    assert wrong.exit_code != 0
    assert "needs an SEV-SNP report" in wrong.output
