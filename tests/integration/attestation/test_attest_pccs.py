"""PccsCollateral against a real HTTP server on loopback serving the samples in PCS v4 format."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from pccs_fake import FakePccs

from sealtorch.attestation import (
    CollateralDirectory,
    CollateralFile,
    CollateralKey,
    DcapVerifier,
    Evidence,
    PccsCollateral,
)
from sealtorch.cli import cli
from sealtorch.errors import CollateralError

SGX_TIME = datetime.fromtimestamp(1750334171, UTC)
TDX_TIME = datetime.fromtimestamp(1750331763, UTC)
SGX_EXPIRY = datetime(2025, 7, 19, 10, 1, 18, tzinfo=UTC)
SGX_KEY = CollateralKey(tee="sgx", fmspc="00A067110000", ca="processor")
TDX_KEY = CollateralKey(tee="tdx", fmspc="B0C06F000000", ca="platform")


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def sgx(attestation_samples: Path) -> Evidence:
    return Evidence(type="sgx-dcap", data=(attestation_samples / "sgx_quote").read_bytes())


@pytest.fixture
def tdx(attestation_samples: Path) -> Evidence:
    return Evidence(type="tdx-dcap", data=(attestation_samples / "tdx_quote").read_bytes())


def test_fetches_with_pcs_v4_paths_caches_and_verifies(
    pccs: FakePccs, tmp_path: Path, sgx: Evidence, tdx: Evidence
) -> None:
    source = PccsCollateral(pccs.url, cache_dir=tmp_path, clock=Clock(SGX_TIME))
    verifier = DcapVerifier(collateral=source)

    claims = verifier.verify(sgx, now=SGX_TIME)
    assert claims.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert sorted(pccs.hits) == sorted(
        [
            "/sgx/certification/v4/pckcrl?ca=processor&encoding=der",
            "/sgx/certification/v4/tcb?fmspc=00A067110000",
            "/sgx/certification/v4/qe/identity?update=standard",
            "/sgx/certification/v4/rootcacrl",
        ]
    )
    assert verifier.verify(tdx, now=TDX_TIME).tcb_status == "UpToDate"
    assert "/tdx/certification/v4/tcb?fmspc=B0C06F000000" in pccs.hits
    assert "/sgx/certification/v4/pckcrl?ca=platform&encoding=der" in pccs.hits
    assert "/tdx/certification/v4/qe/identity?update=standard" in pccs.hits

    # Cached per platform, in the dcap-qvl collateral format (a valid collateral directory).
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "sgx-00A067110000-processor.json",
        "tdx-B0C06F000000-platform.json",
    ]
    assert CollateralFile(tmp_path / SGX_KEY.filename).collateral.key == SGX_KEY
    assert set(CollateralDirectory(tmp_path).keys) == {SGX_KEY, TDX_KEY}

    # The hot path never touches the network while the cached copy is fresh.
    hits = len(pccs.hits)
    for _ in range(5):
        verifier.verify(sgx, now=SGX_TIME)
        verifier.verify(tdx, now=TDX_TIME)
    assert len(pccs.hits) == hits
    assert source.fetch_count == 2


def test_server_down_but_disk_cache_fresh(pccs: FakePccs, tmp_path: Path, sgx: Evidence) -> None:
    PccsCollateral(pccs.url, cache_dir=tmp_path).refresh(SGX_KEY)
    pccs.mode = "down"
    pccs.hits.clear()
    # A new process (new instance) with only the disk cache.
    restarted = PccsCollateral(pccs.url, cache_dir=tmp_path, clock=Clock(SGX_TIME))
    claims = DcapVerifier(collateral=restarted).verify(sgx, now=SGX_TIME)
    assert claims.mrenclave is not None
    assert pccs.hits == []


def test_refreshes_in_the_background_before_next_update(
    pccs: FakePccs, tmp_path: Path, sgx: Evidence
) -> None:
    clock = Clock(SGX_TIME)
    source = PccsCollateral(
        pccs.url,
        cache_dir=tmp_path,
        clock=clock,
        refresh_before=timedelta(days=1),
        retry_after=timedelta(minutes=5),
    )
    verifier = DcapVerifier(collateral=source)
    verifier.verify(sgx, now=SGX_TIME)
    assert source.fetch_count == 1
    assert source.refresh_due(SGX_TIME) == ()

    # Twelve hours before nextUpdate: still fresh, so the request is served from the cache at
    # once even though the PCCS is slow, and a refresh runs in the background.
    clock.now = SGX_EXPIRY - timedelta(hours=12)
    assert source.refresh_due() == (SGX_KEY,)
    pccs.delay = 0.4
    started = time.perf_counter()
    verifier.verify(sgx, now=clock.now)
    assert time.perf_counter() - started < 0.2
    source.wait_for_refreshes(timeout=30)
    assert source.fetch_count == 2

    # Not retried more often than retry_after ...
    pccs.delay = 0
    verifier.verify(sgx, now=clock.now + timedelta(minutes=1))
    source.wait_for_refreshes(timeout=30)
    assert source.fetch_count == 2
    # ... but again after it.
    clock.now += timedelta(minutes=6)
    verifier.verify(sgx, now=clock.now)
    source.wait_for_refreshes(timeout=30)
    assert source.fetch_count == 3


def test_a_failed_background_refresh_keeps_serving_the_fresh_copy(
    pccs: FakePccs, tmp_path: Path, sgx: Evidence
) -> None:
    clock = Clock(SGX_EXPIRY - timedelta(hours=1))
    source = PccsCollateral(pccs.url, cache_dir=tmp_path, clock=clock)
    source.refresh(SGX_KEY)
    pccs.mode = "down"
    verifier = DcapVerifier(collateral=source)
    verifier.verify(sgx, now=SGX_TIME)  # schedules a refresh that fails (logged)
    source.wait_for_refreshes(timeout=30)
    assert verifier.verify(sgx, now=SGX_TIME).mrenclave is not None


def test_stale_cache_and_server_down_is_reported_stale(
    pccs: FakePccs, tmp_path: Path, sgx: Evidence
) -> None:
    PccsCollateral(pccs.url, cache_dir=tmp_path).refresh(SGX_KEY)
    pccs.mode = "down"
    verifier = DcapVerifier(collateral=PccsCollateral(pccs.url, cache_dir=tmp_path))
    with pytest.raises(CollateralError, match=r"refreshing it from .* failed.*HTTP 503") as caught:
        verifier.verify(sgx, now=SGX_EXPIRY + timedelta(days=1))
    assert caught.value.stale


def test_stale_collateral_served_by_the_pccs_is_still_stale(
    pccs: FakePccs, tmp_path: Path, sgx: Evidence
) -> None:
    source = PccsCollateral(pccs.url, cache_dir=tmp_path)
    with pytest.raises(CollateralError) as caught:
        DcapVerifier(collateral=source).verify(sgx, now=datetime.now(UTC))
    assert caught.value.stale
    assert source.fetch_count == 1


def test_no_cache_and_server_down_is_unavailable(
    pccs: FakePccs, tmp_path: Path, sgx: Evidence
) -> None:
    pccs.mode = "down"
    with pytest.raises(CollateralError, match="HTTP 503") as caught:
        DcapVerifier(collateral=PccsCollateral(pccs.url, cache_dir=tmp_path)).verify(
            sgx, now=SGX_TIME
        )
    assert not caught.value.stale


def test_unreachable_server_is_unavailable(tmp_path: Path, sgx: Evidence) -> None:
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    source = PccsCollateral(f"http://127.0.0.1:{port}", cache_dir=tmp_path, timeout=2)
    with pytest.raises(CollateralError, match="cannot fetch collateral") as caught:
        DcapVerifier(collateral=source).verify(sgx, now=SGX_TIME)
    assert not caught.value.stale


@pytest.mark.parametrize(
    ("mode", "message"),
    [("broken-tcb", "malformed collateral"), ("wrong-tcb", "mixed collateral")],
)
def test_bad_pccs_answers_are_refused(
    pccs: FakePccs, tmp_path: Path, mode: str, message: str
) -> None:
    pccs.mode = mode
    with pytest.raises(CollateralError, match=message):
        PccsCollateral(pccs.url, cache_dir=tmp_path).refresh(SGX_KEY)
    assert list(tmp_path.iterdir()) == []


def test_root_ca_crl_from_a_configured_url(pccs: FakePccs, tmp_path: Path, sgx: Evidence) -> None:
    pccs.mode = "no-rootcacrl"
    source = PccsCollateral(
        pccs.url + "/sgx/certification/v4/",  # the API prefix is accepted and ignored
        cache_dir=tmp_path,
        root_ca_crl_url=pccs.url + "/IntelSGXRootCA.der",
    )
    assert DcapVerifier(collateral=source).verify(sgx, now=SGX_TIME).mrenclave is not None
    assert "/IntelSGXRootCA.der" in pccs.paths()


def test_damaged_cache_file_is_refetched(pccs: FakePccs, tmp_path: Path, sgx: Evidence) -> None:
    (tmp_path / SGX_KEY.filename).write_text("{damaged")
    source = PccsCollateral(pccs.url, cache_dir=tmp_path)
    DcapVerifier(collateral=source).verify(sgx, now=SGX_TIME)
    assert source.fetch_count == 1
    assert CollateralFile(tmp_path / SGX_KEY.filename).collateral.key == SGX_KEY


def test_cli_verify_with_pccs_then_offline(
    pccs: FakePccs, tmp_path: Path, attestation_samples: Path
) -> None:
    runner = CliRunner()
    cache = tmp_path / "cache"
    result = runner.invoke(
        cli,
        [
            "attest",
            "verify",
            str(attestation_samples / "tdx_quote"),
            "--pccs-url",
            pccs.url,
            "--cache-dir",
            str(cache),
            "--at",
            "1750331763",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "ALLOWED" in result.output
    fetched = runner.invoke(
        cli,
        [
            "attest",
            "fetch-collateral",
            str(attestation_samples / "sgx_quote"),
            "--pccs-url",
            pccs.url,
            "--cache-dir",
            str(cache),
        ],
    )
    assert fetched.exit_code == 0, fetched.output
    pccs.mode = "down"
    offline = runner.invoke(
        cli,
        [
            "attest",
            "verify",
            str(attestation_samples / "sgx_quote"),
            "--collateral-dir",
            str(cache),
            "--at",
            "1750334171",
        ],
    )
    assert offline.exit_code == 1  # verified; refused by the platform rules
    assert "REFUSED: tcb_status_not_allowed, advisory_not_allowed" in offline.output


def test_a_fresher_copy_from_another_replica_is_adopted_without_fetching(
    pccs: FakePccs, tmp_path: Path
) -> None:
    import json

    replica = PccsCollateral(pccs.url, cache_dir=tmp_path)
    replica.refresh(SGX_KEY)
    fetched = len(pccs.hits)
    # Another replica stores a copy that stays valid longer (here: later TCB info and QE
    # identity nextUpdate; the PCK CRL, valid until 10:23:18, becomes the earliest expiry).
    data = json.loads((tmp_path / SGX_KEY.filename).read_text())
    for field in ("tcb_info", "qe_identity"):
        inner = json.loads(data[field])
        inner["nextUpdate"] = "2025-08-01T00:00:00Z"
        data[field] = json.dumps(inner)
    (tmp_path / SGX_KEY.filename).write_text(json.dumps(data))
    now = SGX_EXPIRY + timedelta(minutes=5)  # the copy in memory has just expired
    adopted = replica.collateral_for(SGX_KEY, now=now)
    assert adopted.next_update == datetime(2025, 7, 19, 10, 23, 18, tzinfo=UTC)
    assert len(pccs.hits) == fetched
