"""`sealtorch attest ...`: exit codes 0 (allowed) / 1 (refused, with reasons) / 2 (usage)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from attest_facts import SGX_ADVISORIES, SGX_MRENCLAVE, SGX_REPORT_DATA, TDX_MRTD, TDX_RTMR0
from click.testing import CliRunner, Result

from sealtorch.attestation import measure
from sealtorch.cli import cli

SGX_AT = "1750334171"
TDX_AT = "1750331763"


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, ["attest", *args])


@pytest.fixture
def samples(attestation_samples: Path) -> Path:
    return attestation_samples


def _policy(tmp_path: Path, doc: dict[str, object], name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def test_help_teaches() -> None:
    result = run("--help")
    assert result.exit_code == 0
    for command in ("verify", "evidence", "measure", "sim-key", "check-policy"):
        assert command in result.output
    verify_help = run("verify", "--help").output
    assert "Exit status" in verify_help
    assert "--collateral" in verify_help


def test_tdx_sample_is_allowed_at_its_time(samples: Path) -> None:
    result = run(
        "verify",
        str(samples / "tdx_quote"),
        "--collateral",
        str(samples / "tdx_quote_collateral.json"),
        "--at",
        TDX_AT,
    )
    assert result.exit_code == 0, result.output
    assert "ALLOWED" in result.output
    assert TDX_MRTD in result.output


def test_sgx_sample_is_refused_by_default_and_allowed_by_a_matching_policy(
    samples: Path, tmp_path: Path
) -> None:
    base = [
        "verify",
        str(samples / "sgx_quote"),
        "--collateral",
        str(samples / "sgx_quote_collateral.json"),
        "--at",
        SGX_AT,
    ]
    refused = run(*base)
    assert refused.exit_code == 1
    assert "REFUSED: tcb_status_not_allowed, advisory_not_allowed" in refused.output
    policy = _policy(
        tmp_path,
        {
            "allowed_tees": ["sgx"],
            "sgx": {"mrenclave": [SGX_MRENCLAVE]},
            "tcb": {
                "accepted_statuses": ["ConfigurationAndSWHardeningNeeded"],
                "allowed_advisories": list(SGX_ADVISORIES),
            },
        },
    )
    allowed = run(*base, "--policy", str(policy), "--report-data", SGX_REPORT_DATA.hex())
    assert allowed.exit_code == 0, allowed.output
    mismatch = run(*base, "--policy", str(policy), "--report-data", "00" * 64, "--json")
    assert mismatch.exit_code == 1
    report = json.loads(mismatch.output)
    assert report["verified"] is True
    assert report["decision"]["reasons"] == ["binding_mismatch"]
    assert report["claims"]["mrenclave"] == SGX_MRENCLAVE


def test_wrong_pins_are_refused_with_reason_codes(samples: Path, tmp_path: Path) -> None:
    policy = _policy(
        tmp_path,
        {
            "allowed_tees": ["tdx"],
            "tdx": {"mrtd": ["00" * 48], "rtmr0": [TDX_RTMR0]},
        },
    )
    result = run(
        "verify",
        str(samples / "tdx_quote"),
        "--collateral",
        str(samples / "tdx_quote_collateral.json"),
        "--at",
        TDX_AT,
        "--policy",
        str(policy),
    )
    assert result.exit_code == 1
    assert "REFUSED: measurement_mismatch" in result.output


def test_today_is_stale(samples: Path) -> None:
    result = run(
        "verify",
        str(samples / "sgx_quote"),
        "--collateral",
        str(samples / "sgx_quote_collateral.json"),
        "--json",
    )
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["verified"] is False
    assert report["decision"]["reasons"] == ["collateral_stale"]


def test_hex_quote_and_collateral_dir(samples: Path, tmp_path: Path) -> None:
    (tmp_path / "quote.hex").write_text("0x" + (samples / "tdx_quote").read_bytes().hex() + "\n")
    collateral = tmp_path / "collateral"
    collateral.mkdir()
    (collateral / "b.json").write_bytes((samples / "tdx_quote_collateral.json").read_bytes())
    result = run(
        "verify", str(tmp_path / "quote.hex"), "--collateral-dir", str(collateral), "--at", TDX_AT
    )
    assert result.exit_code == 0, result.output


def test_tampered_quote_is_refused(samples: Path, tmp_path: Path) -> None:
    data = bytearray((samples / "sgx_quote").read_bytes())
    data[112] ^= 1
    (tmp_path / "q").write_bytes(bytes(data))
    result = run(
        "verify",
        str(tmp_path / "q"),
        "--collateral",
        str(samples / "sgx_quote_collateral.json"),
        "--at",
        SGX_AT,
    )
    assert result.exit_code == 1
    assert "evidence_invalid" in result.output
    assert "signature is invalid" in result.output


def test_garbage_is_refused_not_crashed(tmp_path: Path, samples: Path) -> None:
    (tmp_path / "junk").write_bytes(b"\x03\x00\x02\x00" + b"\xff" * 40)
    result = run(
        "verify", str(tmp_path / "junk"), "--collateral", str(samples / "sgx_quote_collateral.json")
    )
    assert result.exit_code == 1
    assert "evidence_invalid" in result.output


@pytest.mark.parametrize(
    "extra",
    [
        ["--report-data", "abc"],
        ["--collateral-dir", "."],
        ["--cache-dir", "/tmp/x"],
        ["--at", "yesterday"],
    ],
)
def test_usage_errors_exit_2(samples: Path, extra: list[str]) -> None:
    result = run(
        "verify",
        str(samples / "sgx_quote"),
        "--collateral",
        str(samples / "sgx_quote_collateral.json"),
        *extra,
    )
    assert result.exit_code == 2, result.output


def test_dcap_quote_without_collateral_is_a_usage_error(samples: Path) -> None:
    result = run("verify", str(samples / "sgx_quote"))
    assert result.exit_code == 2
    assert "--collateral" in result.output


def test_invalid_policy_exits_2(samples: Path, tmp_path: Path) -> None:
    policy = _policy(tmp_path, {"allowed_tees": ["sgx"]})
    result = run(
        "verify",
        str(samples / "sgx_quote"),
        "--collateral",
        str(samples / "sgx_quote_collateral.json"),
        "--policy",
        str(policy),
    )
    assert result.exit_code == 2
    assert "does not pin its code identity" in result.output
    checked = run("check-policy", str(policy))
    assert checked.exit_code == 2


def test_check_policy_prints_the_normalised_policy(tmp_path: Path) -> None:
    policy = _policy(tmp_path, {"allowed_tees": ["sgx"], "sgx": {"mrenclave": [SGX_MRENCLAVE]}})
    result = run("check-policy", str(policy))
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert data["policy"]["tcb"]["accepted_statuses"] == ["UpToDate"]
    assert len(data["digest"]) == 64


def test_sim_flow_end_to_end(tmp_path: Path) -> None:
    key_file = tmp_path / "host.key"
    public = run("sim-key", "--key-file", str(key_file), "--show-public")
    assert public.exit_code == 0
    trusted = public.output.strip()
    assert trusted.startswith("ed25519:")
    shown = run("sim-key", "--key-file", str(key_file))
    assert trusted in shown.output
    assert str(key_file) in shown.output

    evidence = tmp_path / "ev.sim"
    made = run(
        "evidence",
        "--tee",
        "sim",
        "--role",
        "serve",
        "--sim-key",
        str(key_file),
        "--report-data",
        "11" * 64,
        "-o",
        str(evidence),
    )
    assert made.exit_code == 0, made.output
    measured = run("measure", "--role", "serve")
    assert measured.output.strip() == measure("serve")
    policy = _policy(
        tmp_path, {"allowed_tees": ["sim"], "sim": {"mrenclave": [measured.output.strip()]}}
    )
    ok = run(
        "verify",
        str(evidence),
        "--trust-sim-key",
        trusted,
        "--policy",
        str(policy),
        "--report-data",
        "11" * 64,
    )
    assert ok.exit_code == 0, ok.output
    assert "sim_role" in ok.output
    local = run("verify", str(evidence), "--trust-local-sim-key", "--sim-key", str(key_file))
    assert local.exit_code == 0, local.output

    # signed by another host's key
    stranger = run("sim-key", "--key-file", str(tmp_path / "other.key"), "--show-public")
    untrusted = run("verify", str(evidence), "--trust-sim-key", stranger.output.strip())
    assert untrusted.exit_code == 1
    assert "attestation_key_untrusted" in untrusted.output
    # a policy that does not name sim
    sgx_policy = _policy(
        tmp_path, {"allowed_tees": ["sgx"], "sgx": {"mrenclave": [SGX_MRENCLAVE]}}, "sgx.yaml"
    )
    refused = run("verify", str(evidence), "--trust-sim-key", trusted, "--policy", str(sgx_policy))
    assert refused.exit_code == 1
    assert "simulated_not_allowed" in refused.output
    # no trusted key at all: a usage error
    assert run("verify", str(evidence)).exit_code == 2


@pytest.mark.parametrize("fmt", ["raw", "hex", "json"])
def test_evidence_formats_are_all_readable_by_verify(tmp_path: Path, fmt: str) -> None:
    key_file = tmp_path / "k"
    out = tmp_path / f"ev.{fmt}"
    made = run(
        "evidence",
        "--tee",
        "sim",
        "--sim-key",
        str(key_file),
        "--report-data",
        "22" * 64,
        "-o",
        str(out),
        "--format",
        fmt,
    )
    assert made.exit_code == 0, made.output
    result = run("verify", str(out), "--trust-local-sim-key", "--sim-key", str(key_file), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["claims"]["report_data"] == "22" * 64


def test_evidence_from_gramine_and_failures(tmp_path: Path, samples: Path) -> None:
    root = tmp_path / "attestation"
    root.mkdir()
    (root / "attestation_type").write_text("dcap")
    (root / "quote").write_bytes((samples / "sgx_quote").read_bytes())
    out = tmp_path / "quote.bin"
    ok = run(
        "evidence",
        "--tee",
        "gramine",
        "--tee-root",
        str(root),
        "--report-data",
        SGX_REPORT_DATA.hex(),
        "-o",
        str(out),
    )
    assert ok.exit_code == 0, ok.output
    assert out.read_bytes() == (samples / "sgx_quote").read_bytes()
    absent = run(
        "evidence",
        "--tee",
        "tdx",
        "--tee-root",
        str(tmp_path / "none"),
        "--report-data",
        "00" * 64,
        "-o",
        str(out),
    )
    assert absent.exit_code == 1
    assert "configfs-tsm is not available" in absent.output
    misuse = run(
        "evidence", "--tee", "gramine", "--role", "serve", "--report-data", "00" * 64, "-o", "x"
    )
    assert misuse.exit_code == 2


def test_measure_lists_roles() -> None:
    result = run("measure", "--json")
    data = json.loads(result.output)
    assert set(data["mrenclave"]) == {"keycache", "serve", "app"}
    assert data["mrenclave"]["keycache"] == measure("keycache")
    plain = CliRunner().invoke(cli, ["attest", "measure"])
    assert measure("app") in plain.output
