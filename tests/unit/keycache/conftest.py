"""Key cache unit fixtures: one simulated host (its sim attesters) and a fake clock."""

from __future__ import annotations

import pytest
from keycache_units import Host, make_host

from _fixtures.clock import FakeClock


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Host:
    return make_host(tmp_path_factory.mktemp("sim"))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
