"""Collateral parsing, freshness, and the offline file and directory sources."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from attest_facts import (
    SGX_COLLATERAL_EXPIRY,
    SGX_FMSPC,
    SGX_TIME,
    TDX_COLLATERAL_EXPIRY,
    TDX_FMSPC,
)

from sealtorch.attestation import Collateral, CollateralDirectory, CollateralFile, CollateralKey
from sealtorch.errors import CollateralError, ConfigError

SGX_KEY = CollateralKey(tee="sgx", fmspc=SGX_FMSPC, ca="processor")
TDX_KEY = CollateralKey(tee="tdx", fmspc=TDX_FMSPC, ca="platform")


def _sample(samples: Path, name: str) -> dict[str, str]:
    data: dict[str, str] = json.loads((samples / f"{name}_quote_collateral.json").read_text())
    return data


def test_keys_and_validity_are_read_from_the_content(attestation_samples: Path) -> None:
    sgx = Collateral.from_dict(_sample(attestation_samples, "sgx"), source="sgx")
    tdx = Collateral.from_dict(_sample(attestation_samples, "tdx"), source="tdx")
    assert sgx.key == SGX_KEY
    assert tdx.key == TDX_KEY
    assert sgx.next_update == SGX_COLLATERAL_EXPIRY  # the QE identity expires first
    assert tdx.next_update == TDX_COLLATERAL_EXPIRY  # the PCK CRL expires first
    assert sgx.issued_at == datetime(2025, 6, 19, 10, 56, 11, tzinfo=UTC)
    assert SGX_KEY.filename == "sgx-00A067110000-processor.json"
    assert str(TDX_KEY) == "TDX FMSPC B0C06F000000 (platform CA)"


def test_freshness_window(attestation_samples: Path) -> None:
    sgx = Collateral.from_dict(_sample(attestation_samples, "sgx"), source="sgx")
    assert sgx.require_fresh(SGX_TIME) is sgx
    assert not sgx.is_stale(SGX_COLLATERAL_EXPIRY - timedelta(microseconds=1))
    assert sgx.is_stale(SGX_COLLATERAL_EXPIRY)
    with pytest.raises(CollateralError, match="expired at 2025-07-19T10:01:18Z") as caught:
        sgx.require_fresh(SGX_COLLATERAL_EXPIRY)
    assert caught.value.stale
    with pytest.raises(CollateralError, match="check the clock") as early:
        sgx.require_fresh(datetime(2025, 1, 1, tzinfo=UTC))
    assert not early.value.stale


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("tcb_info"), "missing or non-string field.*tcb_info"),
        (lambda d: d.update(pck_crl=7), "pck_crl"),
        (lambda d: d.update(pck_crl="zz"), "malformed"),
        (lambda d: d.update(root_ca_crl="00"), "malformed"),
        (lambda d: d.update(tcb_info="{"), "malformed"),
        (lambda d: d.update(tcb_info_issuer_chain="not a pem"), "malformed"),
        (lambda d: d.update(qe_identity=d["qe_identity"].replace('"QE"', '"TD_QE"')), "mixed"),
    ],
)
def test_malformed_collateral_is_refused_clearly(
    attestation_samples: Path, mutate: object, message: str
) -> None:
    data: dict[str, object] = dict(_sample(attestation_samples, "sgx"))
    mutate(data)  # type: ignore[operator]
    with pytest.raises(CollateralError, match=message):
        Collateral.from_dict(data, source="test")


def test_not_json_and_not_an_object(tmp_path: Path) -> None:
    with pytest.raises(CollateralError, match="not valid JSON"):
        Collateral.from_json(b"\xff{", source="x")
    with pytest.raises(CollateralError, match="JSON object"):
        Collateral.from_json("[]", source="x")
    with pytest.raises(CollateralError, match="does not exist"):
        CollateralFile(tmp_path / "missing.json")


def test_collateral_key_validation() -> None:
    with pytest.raises(ConfigError):
        CollateralKey(tee="sev", fmspc=SGX_FMSPC, ca="processor")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        CollateralKey(tee="sgx", fmspc="00a067110000", ca="processor")
    with pytest.raises(ConfigError):
        CollateralKey(tee="sgx", fmspc=SGX_FMSPC, ca="root")  # type: ignore[arg-type]


def test_collateral_file_serves_only_its_platform(attestation_samples: Path) -> None:
    source = CollateralFile(attestation_samples / "sgx_quote_collateral.json")
    assert source.collateral_for(SGX_KEY, now=SGX_TIME).key == SGX_KEY
    with pytest.raises(CollateralError, match="is for SGX FMSPC 00A067110000"):
        source.collateral_for(TDX_KEY, now=SGX_TIME)


def test_directory_indexes_by_content_and_rescans(
    attestation_samples: Path, tmp_path: Path
) -> None:
    (tmp_path / "whatever.json").write_bytes(
        (attestation_samples / "sgx_quote_collateral.json").read_bytes()
    )
    (tmp_path / "junk.json").write_text("not collateral")
    (tmp_path / "notes.txt").write_text("ignored")
    source = CollateralDirectory(tmp_path)
    assert source.keys == (SGX_KEY,)
    assert source.collateral_for(SGX_KEY, now=SGX_TIME).key == SGX_KEY
    with pytest.raises(CollateralError, match=r"no collateral for TDX.*tdx-B0C06F000000-platform"):
        source.collateral_for(TDX_KEY, now=SGX_TIME)
    # Dropping a file in makes it available without a restart.
    (tmp_path / "td.json").write_bytes(
        (attestation_samples / "tdx_quote_collateral.json").read_bytes()
    )
    assert source.collateral_for(TDX_KEY, now=SGX_TIME).key == TDX_KEY


def test_directory_prefers_the_freshest_copy(attestation_samples: Path, tmp_path: Path) -> None:
    data = _sample(attestation_samples, "sgx")
    (tmp_path / "a.json").write_text(json.dumps(data))
    older = dict(data)
    qe = json.loads(older["qe_identity"])
    qe["nextUpdate"] = "2025-06-30T00:00:00Z"  # parses; would not verify (signature)
    older["qe_identity"] = json.dumps(qe)
    (tmp_path / "b.json").write_text(json.dumps(older))
    chosen = CollateralDirectory(tmp_path).collateral_for(SGX_KEY, now=SGX_TIME)
    assert chosen.next_update == SGX_COLLATERAL_EXPIRY
    assert chosen.source.endswith("a.json")


def test_directory_must_exist(tmp_path: Path) -> None:
    with pytest.raises(CollateralError, match="does not exist"):
        CollateralDirectory(tmp_path / "nope")


def test_oversized_file_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    with open(big, "wb") as handle:
        handle.truncate(2 * 1024 * 1024)
    with pytest.raises(CollateralError, match="larger than 1 MiB"):
        CollateralFile(big)
