"""Decrypting a sealed body on every core: chunks opened by worker threads, each straight into
its place in the destination.

``cryptography``'s AES-GCM releases the GIL while it decrypts, and so do ``os.preadv`` and the
page faults of a fresh destination buffer, so plain threads scale: on the 2-core development VM
two threads decrypt a fresh 1 GiB buffer at 2.3-3.0 GB/s where one manages 0.9-1.3 GB/s
(``benchmarks/bench_sealed.py``). Threads, not processes: inside an SGX enclave (Gramine) a
process is a second enclave, and threads need nothing but the manifest's thread count.

Security is that of the sequential loop (:meth:`SealedReader.decrypt`): every chunk is
authenticated by its own tag under a nonce that binds its index and whether it is the last,
and each file must end exactly after its last chunk, so reordering, dropping, duplicating or
truncating chunks fails as before. Each thread reads a chunk's ciphertext into a private
buffer with ``pread`` (positional: no shared file offset) and decrypts it from there, so a file
changed underneath cannot make authenticated and decrypted bytes differ. The first failure
stops every thread; the destination then holds unauthenticated bytes that the caller discards,
as with one thread. Memory: the destination plus one chunk per thread.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from sealtorch._crypto.stream import TAG_SIZE, BodyCipher
from sealtorch.errors import ConfigError, IntegrityError
from sealtorch.sealed.header import BodyHeader

__all__ = ["DECRYPT_THREADS_ENV", "Part", "Sink", "decrypt_parts", "decrypt_threads"]

#: Environment variable that sets how many threads decrypt (1: the sequential loop).
DECRYPT_THREADS_ENV: Final = "SEALTORCH_DECRYPT_THREADS"
#: More threads than this stop paying: memory bandwidth, not AES, is then the limit.
_MAX_DEFAULT_THREADS: Final = 16
#: A thread takes consecutive chunks of about this many bytes at a time, so that two threads
#: do not fault the same (2 MiB huge) page of a fresh destination and wait for each other.
_BATCH_BYTES: Final = 8 * 1024 * 1024


@dataclass(frozen=True)
class Part:
    """One file of a model: its descriptor, where its body starts, and its body header."""

    fd: int
    body_start: int
    body: BodyHeader


class Sink(Protocol):
    """Where one worker's chunks go when they do not go straight into a host buffer (a device:
    ``sealtorch.payloads.device``). Each worker has its own."""

    def staging(self, size: int) -> memoryview:
        """A writable buffer of ``size`` bytes that the next chunk is decrypted into."""

    def deliver(self, start: int, end: int) -> None:
        """The authenticated plaintext ``[start, end)`` is in the staging buffer: copy it out
        (before returning: the buffer is reused)."""

    def close(self) -> None:
        """The worker is done (or failed)."""


def decrypt_threads(requested: int | None = None) -> int:
    """How many threads decrypt: ``requested``, else ``$SEALTORCH_DECRYPT_THREADS``, else one
    per core this process may run on (at most 16)."""
    if requested is None:
        text = os.environ.get(DECRYPT_THREADS_ENV, "").strip()
        if text:
            try:
                requested = int(text)
            except ValueError:
                raise ConfigError(
                    f"{DECRYPT_THREADS_ENV}={text!r} is not a number of threads"
                ) from None
        else:
            try:
                cores = len(os.sched_getaffinity(0))
            except (AttributeError, OSError):  # pragma: no cover - not Linux
                cores = os.cpu_count() or 1
            return max(1, min(cores, _MAX_DEFAULT_THREADS))
    if requested < 1:
        raise ConfigError(f"decryption needs at least one thread, not {requested}")
    return requested


@dataclass(frozen=True)
class _Chunk:
    part: int
    index: int
    last: bool
    offset: int  # of the sealed chunk in its file
    start: int  # of its plaintext in the destination
    end: int


def _chunks(parts: Sequence[Part]) -> Iterator[_Chunk]:
    position = 0
    for number, part in enumerate(parts):
        body = part.body
        chunk = body.chunk_size
        end_of_part = position + body.plaintext_size
        last_index = body.chunk_count - 1
        for index in range(body.chunk_count):
            end = min(position + chunk, end_of_part)
            yield _Chunk(
                part=number,
                index=index,
                last=index == last_index,
                offset=part.body_start + index * (chunk + TAG_SIZE),
                start=position,
                end=end,
            )
            position = end


def _batches(parts: Sequence[Part], start: int, end: int) -> Iterator[list[_Chunk]]:
    batch: list[_Chunk] = []
    size = 0
    for chunk in _chunks(parts):
        if chunk.start < start or chunk.start >= end:
            continue
        batch.append(chunk)
        size += chunk.end - chunk.start
        if size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _pread_exact(fd: int, view: memoryview, offset: int) -> None:
    while view:
        got = os.preadv(fd, [view], offset)
        if got <= 0:
            raise IntegrityError()  # the file shrank underneath
        view = view[got:]
        offset += got


def decrypt_parts(
    parts: Sequence[Part],
    cek: bytes,
    target: memoryview | None,
    *,
    threads: int,
    progress: Callable[[int, int], None] | None = None,
    sink: Callable[[], Sink] | None = None,
    start: int = 0,
    end: int | None = None,
) -> int:
    """Authenticate and decrypt every chunk of ``parts`` into ``target`` (or through a
    ``sink()`` per worker) with ``threads`` threads; raise the first failure
    (:class:`IntegrityError`) once every thread has stopped.

    Only the chunks that start in ``[start, end)`` of the plaintext are decrypted (``start``
    on a chunk boundary); the files' ends are checked once the range reaches the end. Returns
    where the decrypted range ends. ``progress(done, total)`` is called from the calling thread
    as chunks complete.
    """
    total = sum(p.body.plaintext_size for p in parts)
    stop_at = total if end is None else min(end, total)
    ciphers = [BodyCipher(cek, salt=p.body.salt, body_digest=p.body.digest) for p in parts]
    largest = max((min(p.body.chunk_size, p.body.plaintext_size) for p in parts), default=0)
    reached = max((c.end for c in _chunks(parts) if c.start < stop_at), default=0)
    if end is None or reached >= total:
        reached = total
    pending = _batches(parts, start, stop_at if stop_at > start else start + 1)
    take = threading.Lock()
    stop = threading.Event()
    done_sizes: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    failures: list[BaseException] = []

    def work() -> None:
        sealed = memoryview(bytearray(largest + TAG_SIZE))
        own = sink() if sink is not None else None
        try:
            while not stop.is_set():
                with take:
                    batch = next(pending, None)
                if batch is None:
                    break
                for chunk in batch:
                    if stop.is_set():
                        break
                    piece = sealed[: chunk.end - chunk.start + TAG_SIZE]
                    _pread_exact(parts[chunk.part].fd, piece, chunk.offset)
                    if own is not None:
                        ciphers[chunk.part].open_into(
                            chunk.index,
                            last=chunk.last,
                            sealed=piece,
                            out=own.staging(chunk.end - chunk.start),
                        )
                        own.deliver(chunk.start, chunk.end)
                    else:
                        if target is None:  # pragma: no cover - checked below
                            raise ValueError("no target and no sink")
                        with target[chunk.start : chunk.end] as out:
                            ciphers[chunk.part].open_into(
                                chunk.index, last=chunk.last, sealed=piece, out=out
                            )
                    done_sizes.put(chunk.end - chunk.start)
        # Whatever stops a worker (a failed tag, an OSError from pread...) must reach the
        # calling thread: a worker that died silently would leave chunks undecrypted.
        except BaseException as exc:  # noqa: BLE001 - re-raised by the calling thread
            failures.append(exc)
            stop.set()
        finally:
            sealed.release()
            if own is not None:
                own.close()
            done_sizes.put(None)

    if target is None and sink is None:
        raise ValueError("decrypt_parts needs a target buffer or a sink")
    workers = [
        threading.Thread(target=work, name=f"sealtorch-decrypt-{n}", daemon=True)
        for n in range(max(1, threads))
    ]
    done = start
    try:
        for worker in workers:
            worker.start()
        running = len(workers)
        while running:
            size = done_sizes.get()
            if size is None:
                running -= 1
            elif not stop.is_set():
                done += size
                if progress is not None:
                    progress(done, total)
    finally:
        stop.set()
        for worker in workers:
            if worker.ident is not None:  # started
                worker.join()
    if failures:
        raise failures[0]
    if done != reached:  # pragma: no cover - every worker ran to the end without a failure
        raise IntegrityError()
    if reached == total:
        # Each file must end right after its last chunk (nothing appended since it was opened).
        for part in parts:
            if os.pread(part.fd, 1, part.body_start + part.body.sealed_size):
                raise IntegrityError()
    return reached
