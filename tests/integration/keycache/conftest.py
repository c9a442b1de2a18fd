"""Key cache integration fixtures: a real key server (uvicorn, Unix socket, SQLite) and a real
key cache app on its own Unix socket, sharing one fake clock so leases are tested at fixed
times without sleeping."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from keycache_helpers import (
    Attesters,
    CacheUnderTest,
    KeyServerControl,
    cache_settings,
    make_attesters,
    running_cache,
)

from _fixtures.clock import FakeClock
from sealtorch.keyserver.masterkey import FileMasterKey
from sealtorch.keyserver.store import Store, open_store, sqlite_url

LEASE = timedelta(minutes=10)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="module")
def attesters(tmp_path_factory: pytest.TempPathFactory) -> Attesters:
    return make_attesters(tmp_path_factory.mktemp("sim"))


@pytest.fixture(scope="module")
def master(tmp_path_factory: pytest.TempPathFactory) -> FileMasterKey:
    return FileMasterKey.create(tmp_path_factory.mktemp("master") / "master.key")


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> Iterator[Store]:
    opened = open_store(sqlite_url(tmp_path / "keys.db"), clock=clock, busy_timeout=5.0)
    opened.migrate()
    yield opened
    opened.close()


@pytest.fixture
def keyserver(
    tmp_path: Path, store: Store, master: FileMasterKey, attesters: Attesters, clock: FakeClock
) -> Iterator[KeyServerControl]:
    control = KeyServerControl(
        tmp=tmp_path,
        store=store,
        master=master,
        attester=attesters.app,
        clock=clock,
        settings={"lease_duration": LEASE},
    )
    control.start()
    yield control
    control.stop()


@pytest.fixture
def cache(
    tmp_path: Path, keyserver: KeyServerControl, attesters: Attesters, clock: FakeClock
) -> Iterator[CacheUnderTest]:
    """A cache over the key server that holds two models (m1, m2) at start."""
    for model_id in ("m1", "m2"):
        keyserver.server.add_model(model_id, policy=attesters.policy())
    with running_cache(
        cache_settings(tmp_path, attesters, keyserver), clock=clock, attester=attesters.cache
    ) as running:
        yield running
