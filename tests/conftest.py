"""Fixtures shared by every test directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.database import (
    DirectoryBasedExampleDatabase,
    ExampleDatabase,
    InMemoryExampleDatabase,
)

pytest_plugins = ["_fixtures.postgres", "_fixtures.softhsm"]


def _example_database() -> ExampleDatabase:
    """Hypothesis keeps the failing examples it found in .hypothesis/ under the working
    directory, to replay them first next time. Where that cannot be written (a read-only
    checkout) they are kept in memory: Hypothesis would warn, and warnings are errors here."""
    path = Path.cwd() / ".hypothesis" / "examples"
    existing = next(parent for parent in (path, *path.parents) if parent.exists())
    if existing.is_dir() and os.access(existing, os.R_OK | os.W_OK | os.X_OK):
        return DirectoryBasedExampleDatabase(path)
    return InMemoryExampleDatabase()


settings.register_profile(
    "default",
    database=_example_database(),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session")
def attestation_samples() -> Path:
    """The real Intel-signed quotes and collateral in tests/data/attestation (provenance in its
    README.md). Read-only: a test that needs a damaged copy writes one under tmp_path."""
    return Path(__file__).resolve().parent / "data" / "attestation"
