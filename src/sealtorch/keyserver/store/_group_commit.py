"""Group commit: one thread commits submitted units of work in groups (``Store.submit``).

Work submitted while a group is being committed waits for the next group, so under load many
requests share one transaction and one disk flush, and at low load a request is committed at
once (no timer). The committer first takes the store's write lock, then takes every waiting unit
of work (up to :data:`MAX_GROUP`), runs each in order on one transaction
(:class:`~sealtorch.keyserver.store._transactions.GroupTransaction`), flushes and commits, and
only then completes the futures: a caller learns its result only once it is durable (or that
nothing was committed).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from sealtorch.errors import AuditError, StorageError
from sealtorch.keyserver.records import SpentNonce
from sealtorch.keyserver.store._engine import failure_kind, first_line
from sealtorch.keyserver.store._raw import RawStatements
from sealtorch.keyserver.store._sqlite_lock import SqliteWriteLock
from sealtorch.keyserver.store._transactions import GroupTransaction

__all__ = ["MAX_GROUP", "GroupCommitter"]

_log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Most submitted units of work committed together in one group (one transaction).
MAX_GROUP = 256

#: Opens a write transaction and yields its connection.
BeginWrite = Callable[[], AbstractContextManager[sa.Connection]]


@dataclass(frozen=True, slots=True)
class _Work:
    function: Callable[[Any], Any]
    future: Future[Any]
    nonce: SpentNonce | None = None


class GroupCommitter:
    """The committer thread and its queue (see the module docstring)."""

    def __init__(
        self,
        *,
        begin_write: BeginWrite,
        raw: RawStatements,
        sqlite_lock: SqliteWriteLock | None,
        clock: Callable[[], datetime],
        backend: str,
        on_failure: Callable[[BaseException], None] = lambda exc: None,
    ) -> None:
        self._begin_write = begin_write
        self._on_failure = on_failure
        self._sqlite_lock = sqlite_lock
        self._clock = clock
        self._backend = backend
        self._raw = raw
        # Units of work in submission order; None: the close marker.
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stopping = False  # the committer took the close marker

    def submit(self, function: Callable[[Any], _T], *, nonce: SpentNonce | None) -> Future[_T]:
        future: Future[_T] = Future()
        with self._lock:  # against close(): a unit is either before the close marker or refused
            if self._closed:
                raise StorageError("the key store is closed")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="sealtorch-keystore-commit", daemon=True
                )
                self._thread.start()
            # A C call that wakes a committer waiting in get() (no condition variable: the
            # committer never waits for this lock); a busy committer finds the unit when it
            # takes its next group.
            self._queue.put(_Work(function, future, nonce))
        return future

    def _take(self, first: _Work) -> list[_Work]:
        """``first`` and the units waiting behind it, up to ``MAX_GROUP``; those whose caller
        gave up are dropped (a taken unit can no longer be cancelled: its caller waits for the
        outcome). The close marker ends the committer after this group."""
        waiting = [first]
        while len(waiting) < MAX_GROUP:
            try:
                work = self._queue.get_nowait()
            except queue.Empty:
                break
            if work is None:
                self._stopping = True
                break
            waiting.append(work)
        return [work for work in waiting if work.future.set_running_or_notify_cancel()]

    def _run(self) -> None:
        while not self._stopping:
            first = self._queue.get()
            if first is None:
                return
            self._commit_group(first)

    def close(self, timeout: float = 30.0) -> None:
        """Commit what was submitted before, then stop; later units are refused."""
        with self._lock:
            self._closed = True
            thread = self._thread
            self._queue.put(None)
        if thread is not None:
            thread.join(timeout)
        while True:
            try:
                work = self._queue.get_nowait()
            except queue.Empty:
                break
            if work is not None and work.future.set_running_or_notify_cancel():
                work.future.set_exception(StorageError("the key store was closed"))

    def _commit_group(self, first: _Work) -> None:
        """Commit ``first`` and the units behind it (the committer thread's body)."""
        group: list[_Work] | None = None
        outcomes: list[tuple[_Work, bool, Any]] = []
        lock = self._sqlite_lock
        try:
            # SQLite: the write lock before taking the group, so that it grows meanwhile.
            with lock.patient() if lock else contextlib.nullcontext():
                group = self._take(first)
                if group:
                    self._run_group(group, outcomes)
        except (sa_exc.SQLAlchemyError, StorageError) as exc:
            self._fail_group(self._take(first) if group is None else group, exc)
            return
        except Exception as exc:  # noqa: BLE001 - the committer must survive; callers learn it
            _log.error("group commit failed unexpectedly: %s", type(exc).__name__)
            self._fail_group(self._take(first) if group is None else group, exc)
            return
        for work, ok, value in outcomes:
            if ok:
                work.future.set_result(value)
            else:
                work.future.set_exception(value)

    def _run_group(self, group: list[_Work], outcomes: list[tuple[_Work, bool, Any]]) -> None:
        tx: GroupTransaction | None = None
        try:
            with self._begin_write() as conn:
                nonces = [work.nonce for work in group if work.nonce is not None]
                tx = GroupTransaction(conn, self._clock, nonces, raw=self._raw)
                for work in group:
                    mark = tx.mark()
                    try:
                        outcomes.append((work, True, work.function(tx)))
                    except sa_exc.SQLAlchemyError:
                        raise  # the transaction is broken: the whole group fails
                    except Exception as exc:  # noqa: BLE001 - handed to that caller
                        tx.undo(mark)
                        outcomes.append((work, False, exc))
                tx.flush()
        except sa_exc.SQLAlchemyError as exc:
            if tx is not None and tx.records:
                raise AuditError(
                    f"the audit records could not be committed ({first_line(exc)}); "
                    "nothing was committed"
                ) from exc
            raise

    def _fail_group(self, group: list[_Work], exc: BaseException) -> None:
        """Every caller of a failed group gets its own error (nothing of it was committed)."""
        self._on_failure(exc)
        for work in group:
            error: StorageError
            if isinstance(exc, AuditError):
                error = AuditError(str(exc))
            elif isinstance(exc, StorageError):
                error = StorageError(str(exc))
            elif isinstance(exc, sa_exc.SQLAlchemyError):
                error = failure_kind(exc)(
                    f"the key store ({self._backend}) failed while committing "
                    f"({first_line(exc)}); check that the database is reachable"
                )
            else:
                error = StorageError("the key store failed while committing (internal error)")
            error.__cause__ = exc
            work.future.set_exception(error)
