"""Work run in separate OS processes (``multiprocessing`` spawn) by concurrency tests.

Each worker opens its own store — as a separate key server replica would — waits at the
shared start barrier so that the processes really overlap, does its part, and reports through a
queue. Results are plain picklable values.
"""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sealtorch.keyserver.records import SpentNonce
from sealtorch.keyserver.store import open_store
from sealtorch.protocol.audit import AuditEntry, AuditKind

START_TIMEOUT = 60.0


def _report(out: Any, work: Callable[[], Any]) -> None:
    try:
        out.put(("ok", work()))
    except BaseException:  # noqa: BLE001 - report everything to the parent; it fails the test
        out.put(("error", traceback.format_exc()))


def spend_nonces(url: str, nonces: list[bytes], start: Any, out: Any) -> None:
    """Try to spend every nonce; report the ones this process got."""

    def work() -> list[bytes]:
        store = open_store(url, busy_timeout=30.0)
        try:
            store.ping()  # connect before the barrier, so the real work overlaps
            start.wait(START_TIMEOUT)
            expires_at = datetime.now(UTC) + timedelta(minutes=5)
            return [n for n in nonces if store.spend_nonce(SpentNonce(n, expires_at))]
        finally:
            store.close()

    _report(out, work)


def append_audit(url: str, tag: str, count: int, start: Any, out: Any) -> None:
    """Append ``count`` records (request ids ``tag-i``); report the sequence numbers received."""

    def work() -> list[int]:
        store = open_store(url, busy_timeout=30.0)
        try:
            store.ping()
            start.wait(START_TIMEOUT)
            seqs = []
            for i in range(count):
                entry = AuditEntry(
                    kind=AuditKind.RELEASE,
                    action="release",
                    decision="allow",
                    request_id=f"{tag}-{i}",
                    client_address=tag,
                    model_ids=["m"],
                )
                seqs.append(store.append_audit(entry).seq)
            return seqs
        finally:
            store.close()

    _report(out, work)


def migrate(url: str, start: Any, out: Any) -> None:
    """Run the schema migration; report the resulting version."""

    def work() -> int:
        store = open_store(url, busy_timeout=30.0)
        try:
            start.wait(START_TIMEOUT)
            return store.migrate()
        finally:
            store.close()

    _report(out, work)


def run_in_processes(
    target: Callable[..., None], args_per_process: list[tuple[Any, ...]], *, timeout: float = 120
) -> list[Any]:
    """Start one spawned process per argument tuple, release them together, collect results."""
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(len(args_per_process))  # everyone starts together
    out = context.Queue()
    processes = [
        context.Process(target=target, args=(*args, start, out), daemon=True)
        for args in args_per_process
    ]
    for process in processes:
        process.start()
    results = []
    try:
        for _ in processes:
            status, value = out.get(timeout=timeout)
            if status != "ok":
                raise AssertionError(f"worker process failed:\n{value}")
            results.append(value)
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
        out.close()
    return results


def serve_nothing(sock: Any) -> None:
    """A key server worker that cannot start (its serve function fails at once)."""
    raise OSError(f"cannot serve {sock!r}: broken on purpose")
