"""Key server integration fixtures: a migrated store on a real SQLite file and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from _fixtures.clock import FakeClock
from sealtorch.keyserver.masterkey import FileMasterKey
from sealtorch.keyserver.store import Store, open_store, sqlite_url

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "keys.db")
    url: str = request.getfixturevalue("postgres")
    return url


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(store_url: str, clock: FakeClock) -> Iterator[Store]:
    opened = open_store(store_url, clock=clock, busy_timeout=2.0)
    opened.migrate()
    yield opened
    opened.close()


@pytest.fixture(scope="session")
def master(tmp_path_factory: pytest.TempPathFactory) -> FileMasterKey:
    return FileMasterKey.create(tmp_path_factory.mktemp("master") / "master.key")
