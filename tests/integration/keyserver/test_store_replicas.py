"""Several key server processes on one database: nonces single-use, one audit chain, migrations.

Each worker is a separate OS process with its own store (engine and connection pool), started
together at a barrier, as replicas behind a load balancer would be.
"""

from __future__ import annotations

import secrets

import pytest

from _fixtures import workers
from sealtorch.keyserver.store import Store, open_store, sqlite_url
from sealtorch.keyserver.store._migrations import MIGRATIONS
from sealtorch.protocol.audit import verify_chain


def test_nonces_are_spent_once_across_processes(store: Store, store_url: str) -> None:
    nonces = [secrets.token_bytes(32) for _ in range(150)]
    results = workers.run_in_processes(
        workers.spend_nonces, [(store_url, nonces), (store_url, list(reversed(nonces)))]
    )
    got = [n for result in results for n in result]
    assert sorted(got) == sorted(nonces)  # each nonce spent by exactly one process
    assert len(set(got)) == len(got)


def test_concurrent_appenders_build_one_valid_chain(store: Store, store_url: str) -> None:
    per_process = 100
    results = workers.run_in_processes(
        workers.append_audit, [(store_url, "a", per_process), (store_url, "b", per_process)]
    )
    seqs = sorted(s for result in results for s in result)
    assert seqs == list(range(1, 2 * per_process + 1))
    head = store.audit_head()
    summary = verify_chain(store.iter_audit(), head=head)
    assert summary.count == 2 * per_process
    request_ids = {r.request_id for r in store.iter_audit()}
    assert request_ids == {f"{tag}-{i}" for tag in "ab" for i in range(per_process)}
    if store.backend == "postgresql":  # row locks queue fairly; SQLite's busy wait backs off
        interleaved = [r.client_address for r in store.iter_audit()]
        assert interleaved != sorted(interleaved), "the processes did not overlap"


@pytest.mark.postgres
def test_replicas_migrate_a_fresh_database_concurrently(postgres: str) -> None:
    versions = workers.run_in_processes(workers.migrate, [(postgres,), (postgres,), (postgres,)])
    assert versions == [len(MIGRATIONS)] * 3
    store = open_store(postgres)
    try:
        store.check_schema()
        assert store.audit_head().seq == 0
    finally:
        store.close()


def test_sqlite_processes_migrate_concurrently(tmp_path: pytest.TempPathFactory) -> None:
    url = sqlite_url(tmp_path / "shared.db")  # type: ignore[operator]
    assert workers.run_in_processes(workers.migrate, [(url,), (url,)]) == [len(MIGRATIONS)] * 2
