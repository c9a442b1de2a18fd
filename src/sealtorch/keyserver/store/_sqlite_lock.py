"""The SQLite write lock: one writer at a time, across threads and worker processes.

Writers queue on this lock instead of in SQLite's busy handler, whose sleeps (up to 100 ms each)
make a long latency tail under concurrent requests.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sealtorch.errors import StorageError

__all__ = ["SqliteWriteLock"]


class SqliteWriteLock:
    """Serialises SQLite writers: a thread lock, then an exclusive ``flock`` on ``DB.lock``
    (other processes: ``--workers``). A writer that waits longer than the busy timeout gets a
    StorageError. A killed holder's ``flock`` is released by the kernel."""

    def __init__(self, database: Path, timeout: float) -> None:
        self._thread_lock = threading.RLock()
        self._path = database.with_name(database.name + ".lock")
        self._timeout = timeout
        self._fd: int | None = None
        self._depth = 0

    def __enter__(self) -> None:
        self._acquire(patient=False)

    @contextmanager
    def patient(self) -> Iterator[None]:
        """The lock for the group committer: it waits for another process without polling
        (the kernel wakes it the moment the holder lets go, so two worker processes take turns
        instead of one starving while it sleeps between polls) and without a time limit — its
        callers time out on their own and withdraw the work that has not started."""
        self._acquire(patient=True)
        try:
            yield
        finally:
            self.__exit__()

    def _acquire(self, *, patient: bool) -> None:
        if not self._thread_lock.acquire(timeout=self._timeout):
            raise StorageError("the key store is busy (timed out waiting for the write lock)")
        self._depth += 1
        if self._depth > 1:
            return
        try:
            if self._fd is None:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            if patient:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            else:
                _flock(self._fd, self._timeout)
        except BaseException:
            self._depth -= 1
            self._thread_lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        try:
            if self._depth == 0 and self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()


def _flock(fd: int, timeout: float) -> None:
    """Take the exclusive lock, retrying every 0.1-2 ms (not SQLite's up-to-100 ms sleeps)."""
    deadline = time.monotonic() + timeout
    delay = 0.0001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise StorageError(
                    "the key store is busy (another process held the write lock too long)"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 0.002)
