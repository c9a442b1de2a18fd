"""Group commit (``Store.submit``) on a real SQLite file and a real PostgreSQL database.

Units of work that wait together share one transaction; each still gets exactly its own outcome,
a failing unit leaves nothing behind, a group that cannot write its audit records commits
nothing, and a nonce is spent once however many units present it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pytest

from _fixtures.clock import FakeClock
from _fixtures.keystore import refuse_audit_inserts, release_entry
from sealtorch.errors import AuditError
from sealtorch.keyserver.records import SpentNonce
from sealtorch.keyserver.store import GroupTransaction, Store
from sealtorch.protocol.audit import verify_chain

NONCE = SpentNonce(b"\x11" * 32, datetime(2100, 1, 1, tzinfo=UTC))


@contextmanager
def _held(store: Store) -> Iterator[None]:
    """Keep the committer busy, so that everything submitted meanwhile forms the next group."""
    entered, leave = threading.Event(), threading.Event()

    def block(tx: GroupTransaction) -> None:
        del tx
        entered.set()
        assert leave.wait(30)

    blocker = store.submit(block)
    assert entered.wait(30)
    try:
        yield
    finally:
        leave.set()
        blocker.result(30)


def _results(futures: list[Future[Any]]) -> list[Any]:
    out: list[Any] = []
    for future in futures:
        try:
            out.append(future.result(30))
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            out.append(exc)
    return out


def _spend(tx: GroupTransaction) -> bool:
    return tx.spend_nonce(NONCE)


def test_a_nonce_presented_by_many_units_of_one_group_is_spent_once(store: Store) -> None:
    with _held(store):
        futures = [store.submit(_spend, nonce=NONCE) for _ in range(5)]
        futures.append(store.submit(_spend))  # undeclared: its own statement
    assert _results(futures) == [True, False, False, False, False, False]
    assert store.spend_nonce(NONCE) is False


def test_nonces_spent_before_or_declared_by_others_in_a_group(store: Store) -> None:
    other = SpentNonce(b"\x12" * 32, NONCE.expires_at)
    assert store.spend_nonce(NONCE) is True
    with _held(store):
        replayed = store.submit(_spend, nonce=NONCE)
        fresh = store.submit(lambda tx: tx.spend_nonce(other), nonce=other)
    assert replayed.result(30) is False
    assert fresh.result(30) is True


def test_a_failing_unit_leaves_nothing_and_the_others_commit_in_order(store: Store) -> None:
    def failing(tx: GroupTransaction) -> None:
        tx.append_audit(release_entry("m", request_id="failed"))
        raise ValueError("this unit fails")

    with _held(store):
        futures = [
            store.submit(lambda tx: tx.append_audit(release_entry("m", request_id="first"))),
            store.submit(failing),
            store.submit(lambda tx: tx.append_audit(release_entry("m", request_id="third"))),
        ]
    outcomes = _results(futures)
    assert outcomes[0] is None
    assert outcomes[2] is None
    assert isinstance(outcomes[1], ValueError)
    records = list(store.iter_audit())
    assert [r.request_id for r in records] == ["first", "third"]
    assert verify_chain(records, head=store.audit_head()).count == 2


def test_a_group_whose_audit_records_cannot_be_written_commits_nothing(
    store: Store, clock: FakeClock
) -> None:
    """Fail closed for every unit of the group: no unit is told it succeeded."""
    engine = refuse_audit_inserts(store)

    def decide(tx: GroupTransaction) -> bool:
        spent = tx.spend_nonce(NONCE)
        tx.append_audit(release_entry("m"))
        return spent

    with _held(store):
        futures = [store.submit(decide, nonce=NONCE) for _ in range(3)]
    for outcome in _results(futures):
        assert isinstance(outcome, AuditError)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "DROP TRIGGER refuse_audit" + ("" if store.backend == "sqlite" else " ON audit_log")
        )
    assert store.spend_nonce(NONCE) is True  # rolled back: not spent
    assert list(store.iter_audit()) == []


def test_work_withdrawn_before_it_started_never_runs(store: Store) -> None:
    ran = threading.Event()

    def work(tx: GroupTransaction) -> None:
        ran.set()
        tx.append_audit(release_entry("m", request_id="withdrawn"))

    with _held(store):
        withdrawn = store.submit(work)
        assert withdrawn.cancel()  # still waiting: its caller gave up (busy timeout)
    store.submit(lambda tx: tx.append_audit(release_entry("m", request_id="later"))).result(30)
    assert not ran.is_set()
    assert [r.request_id for r in store.iter_audit()] == ["later"]


def test_a_closed_store_refuses_new_work(tmp_path: Any) -> None:
    from sealtorch.errors import StorageError
    from sealtorch.keyserver.store import open_store, sqlite_url

    opened = open_store(sqlite_url(tmp_path / "closed.db"))
    opened.migrate()
    opened.close()
    with pytest.raises(StorageError, match="closed"):
        opened.submit(lambda tx: None)
