"""Fixtures shared by every test directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

pytest_plugins = ["_fixtures.postgres", "_fixtures.softhsm"]

settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session")
def attestation_samples() -> Path:
    """The real Intel-signed quotes and collateral in tests/data/attestation (provenance in its
    README.md). Read-only: a test that needs a damaged copy writes one under tmp_path."""
    return Path(__file__).resolve().parent / "data" / "attestation"
