"""Key server integration fixtures: a migrated store on a real SQLite file and on PostgreSQL,
and a real key server (uvicorn, TLS on loopback) around it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from _fixtures.clock import FakeClock
from _fixtures.keyserver import KeyServerUnderTest, TlsFiles, make_tls, running_keyserver
from sealtorch.attestation import SimAttester
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


# -- a running key server (real uvicorn, TLS on loopback) around the store above ----------------


@pytest.fixture(scope="session")
def sim_attester(tmp_path_factory: pytest.TempPathFactory) -> SimAttester:
    attester = SimAttester(role="app", key_path=tmp_path_factory.mktemp("sim") / "sim.key")
    assert attester.mrenclave  # measure once per session
    return attester


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def keyserver(
    store: Store,
    clock: FakeClock,
    master: FileMasterKey,
    sim_attester: SimAttester,
    tls_files: TlsFiles,
    tmp_path: Path,
) -> Iterator[KeyServerUnderTest]:
    with running_keyserver(
        tmp_path, store=store, master=master, attester=sim_attester, clock=clock, tls=tls_files
    ) as server:
        yield server
