"""Key server tests use the shared infrastructure fixtures (PostgreSQL, SoftHSM2)."""

from __future__ import annotations

import pytest

from _fixtures import register


def pytest_configure(config: pytest.Config) -> None:
    # Idempotent; becomes a no-op once tests/conftest.py lists _fixtures.PLUGINS.
    register(config)
