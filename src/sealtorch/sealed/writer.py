"""Streaming writer of sealed files.

The plaintext size must be known up front (it is part of the authenticated header); the
plaintext is then fed in pieces of any size with :meth:`SealedWriter.write` and encrypted chunk
by chunk, so a model is never held twice in memory. Output goes to a temporary file that is
renamed over the destination only when the last chunk has been written and synced.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from sealtorch._crypto.stream import CEK_SIZE, TAG_SIZE, BodyCipher
from sealtorch.errors import ConfigError, PayloadError
from sealtorch.sealed._atomic import AtomicFile
from sealtorch.sealed.header import (
    BODY_SALT_SIZE,
    DEFAULT_CHUNK_SIZE,
    BodyHeader,
    Header,
    KeyBlock,
    ShardHeader,
)
from sealtorch.sealed.keywrap import ContentKeyWrapper

__all__ = ["SealedWriter"]

Progress = Callable[[int], None]


class SealedWriter:
    """Write one sealed file.

    >>> with SealedWriter(
    ...     "m.sealed", model_id="m", plaintext_size=3, wrapper=w
    ... ) as out:  # doctest: +SKIP
    ...     out.write(b"abc")
    """

    def __init__(
        self,
        destination: str | os.PathLike[str] | BinaryIO,
        *,
        model_id: str,
        plaintext_size: int,
        wrapper: ContentKeyWrapper,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        overwrite: bool = False,
        progress: Progress | None = None,
        _random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        # _random_bytes exists for the published test vector only (docs/format.md); anything
        # but the OS CSPRNG default would destroy the format's security.
        body = BodyHeader(
            model_id=model_id,
            plaintext_size=plaintext_size,
            chunk_size=chunk_size,
            salt=_random_bytes(BODY_SALT_SIZE),
        )
        cek = _random_bytes(CEK_SIZE)
        key_block = wrapper.wrap(model_id=model_id, body_digest=body.digest, cek=cek)
        if not isinstance(key_block, KeyBlock):
            raise ConfigError(f"key wrapper {wrapper!r} did not return a KeyBlock")
        self._start(
            destination,
            Header(body=body, key=key_block),
            cek,
            overwrite=overwrite,
            progress=progress,
            defer_commit=False,
        )

    @classmethod
    def prepared(
        cls,
        destination: str | os.PathLike[str],
        *,
        header: Header | ShardHeader,
        cek: bytes,
        overwrite: bool = False,
        progress: Progress | None = None,
    ) -> SealedWriter:
        """A writer for one file of a sealed set, whose header and content key the set chose.

        :meth:`finish` leaves the file as a temporary file; :meth:`commit` puts it in place.
        """
        writer = cls.__new__(cls)
        writer._start(
            destination, header, cek, overwrite=overwrite, progress=progress, defer_commit=True
        )
        return writer

    def _start(
        self,
        destination: str | os.PathLike[str] | BinaryIO,
        header: Header | ShardHeader,
        cek: bytes,
        *,
        overwrite: bool,
        progress: Progress | None,
        defer_commit: bool,
    ) -> None:
        body = header.body
        chunk_size = body.chunk_size
        self.header = header
        self._defer_commit = defer_commit
        self._cipher = BodyCipher(cek, salt=body.salt, body_digest=body.digest)
        del cek
        self._chunk_size = chunk_size
        self._chunks = body.chunk_count
        self._buffer = bytearray(chunk_size)
        self._buffer_view = memoryview(self._buffer)
        self._out = memoryview(bytearray(chunk_size + TAG_SIZE))
        self._fill = 0
        self._index = 0
        self._consumed = 0
        self._progress = progress
        self._finished = False
        self._atomic: AtomicFile | None = None
        if isinstance(destination, str | os.PathLike):
            self._atomic = AtomicFile(Path(destination), overwrite=overwrite)
            self._stream: BinaryIO = self._atomic.file
        else:
            self._stream = destination
        try:
            self._write_all(memoryview(self.header.encode()))
        except BaseException:
            self.abort()
            raise

    @property
    def destination(self) -> Path | None:
        return self._atomic.target if self._atomic is not None else None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append plaintext (any buffer; it is not copied when it covers whole chunks)."""
        view = memoryview(data).cast("B")
        size = len(view)
        if self._consumed + size > self.header.body.plaintext_size:
            raise PayloadError(
                "the model produced more bytes than announced (did the source change while "
                "it was being sealed?)"
            )
        self._consumed += size
        chunk = self._chunk_size
        position = 0
        while position < size:
            if self._fill == 0 and size - position >= chunk:
                self._seal(view[position : position + chunk])
                position += chunk
                continue
            take = min(chunk - self._fill, size - position)
            self._buffer_view[self._fill : self._fill + take] = view[position : position + take]
            self._fill += take
            position += take
            if self._fill == chunk:
                self._seal(self._buffer_view)
                self._fill = 0

    def _seal(self, plaintext: memoryview) -> None:
        last = self._index == self._chunks - 1
        out = self._out[: len(plaintext) + TAG_SIZE]
        self._cipher.seal_into(self._index, last=last, plaintext=plaintext, out=out)
        self._write_all(out)
        self._index += 1
        if self._progress is not None:
            self._progress(len(plaintext))

    def _write_all(self, view: memoryview) -> None:
        if self._atomic is not None:
            self._atomic.write(view)
            return
        while view:
            written = self._stream.write(view)
            view = view[written:]

    def finish(self) -> Header | ShardHeader:
        """Seal the last chunk and commit the file; returns the header written."""
        if self._finished:
            return self.header
        try:
            if self._consumed != self.header.body.plaintext_size:
                raise PayloadError(
                    f"the model produced {self._consumed} bytes but "
                    f"{self.header.body.plaintext_size} were announced (did the source change "
                    "while it was being sealed?)"
                )
            if self._fill or self._index < self._chunks:
                self._seal(self._buffer_view[: self._fill])
                self._fill = 0
            if self._index != self._chunks:  # pragma: no cover - guarded by the size checks
                raise PayloadError("internal error: chunk count mismatch")
            if self._atomic is not None:
                if self._defer_commit:
                    self._atomic.file.flush()
                else:
                    self._atomic.commit()
            else:
                self._stream.flush()
        except BaseException:
            self.abort()
            raise
        self._finished = True
        return self.header

    def commit(self) -> None:
        """Put a finished file of a sealed set in place (see :meth:`prepared`)."""
        if self._atomic is not None:
            self._atomic.commit()

    def abort(self) -> None:
        """Discard everything written (the destination is untouched)."""
        self._finished = True
        if self._atomic is not None:
            self._atomic.abort()

    def __enter__(self) -> SealedWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()

    def __repr__(self) -> str:
        return (
            f"SealedWriter(model_id={self.header.body.model_id!r}, destination={self.destination})"
        )
