"""Fixtures for the attestation unit tests: the real samples, pinned clocks, a private sim key."""

from __future__ import annotations

from pathlib import Path

import pytest

from sealtorch.attestation import (
    CollateralFile,
    DcapVerifier,
    Evidence,
    SimAttester,
    SimVerifier,
)


@pytest.fixture(autouse=True)
def _private_sim_key(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Every test gets its own sim key location (never the user's home)."""
    path = tmp_path_factory.mktemp("simkey") / "sim-attestation.key"
    monkeypatch.setenv("SEALTORCH_SIM_KEY", str(path))
    return path


@pytest.fixture(scope="session")
def sgx_evidence(attestation_samples: Path) -> Evidence:
    return Evidence(type="sgx-dcap", data=(attestation_samples / "sgx_quote").read_bytes())


@pytest.fixture(scope="session")
def tdx_evidence(attestation_samples: Path) -> Evidence:
    return Evidence(type="tdx-dcap", data=(attestation_samples / "tdx_quote").read_bytes())


@pytest.fixture(scope="session")
def sgx_verifier(attestation_samples: Path) -> DcapVerifier:
    return DcapVerifier(
        collateral=CollateralFile(attestation_samples / "sgx_quote_collateral.json")
    )


@pytest.fixture(scope="session")
def tdx_verifier(attestation_samples: Path) -> DcapVerifier:
    return DcapVerifier(
        collateral=CollateralFile(attestation_samples / "tdx_quote_collateral.json")
    )


@pytest.fixture
def sim_attester(tmp_path: Path) -> SimAttester:
    return SimAttester("serve", key_path=tmp_path / "host-sim.key")


@pytest.fixture
def sim_verifier(sim_attester: SimAttester) -> SimVerifier:
    return SimVerifier(trusted_keys=[sim_attester.public_key])
