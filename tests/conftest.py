"""Fixtures shared by every test directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

REPO_ROOT = Path(__file__).resolve().parents[1]

pytest_plugins = ["_fixtures.postgres", "_fixtures.softhsm"]

settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def _shared_dir() -> Path:
    configured = os.environ.get("SEALTORCH_SHARED_DIR")
    return Path(configured) if configured else REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def attestation_samples() -> Path:
    """The real Intel-signed quotes and collateral in ../shared/attestation-samples (read-only)."""
    path = _shared_dir() / "attestation-samples"
    if not (path / "sgx_quote").is_file():
        pytest.fail(
            f"attestation samples not found at {path}; the repository must sit next to the "
            "'shared' directory, or set SEALTORCH_SHARED_DIR"
        )
    return path
