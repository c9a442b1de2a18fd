"""Reading sealed files: parse the public header, obtain the key, authenticate and decrypt.

The file size must equal exactly what the header announces, so truncation or appended bytes are
refused before the key is even requested; reads are re-checked while decrypting in case the file
changes underneath. Ciphertext is read with ``readinto`` into one reusable buffer (a private
copy: a file modified concurrently cannot make authenticated and decrypted bytes differ, and a
file truncated concurrently cannot crash the process as a memory map would), and each chunk is
decrypted straight into its place in the destination.

Nothing decrypted is exposed until every chunk has authenticated: :meth:`SealedReader.decrypt`
returns the plaintext only then, and :meth:`SealedReader.iter_plaintext` is for callers that
write to a temporary file and discard it on failure.

A sealed set (format version 2: one model in several files) is opened by its first file; the
reader opens the others (:func:`sealtorch.sealed.sets.member_path`), checks each one's header
against the digest the first file lists before any key is requested, and decrypts the files in
order into one buffer, as if they were one body.
"""

from __future__ import annotations

import io
import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, cast

from sealtorch._crypto.stream import TAG_SIZE, BodyCipher
from sealtorch.errors import ConfigError, IntegrityError
from sealtorch.keys import DataKey, KeyProvider
from sealtorch.sealed.header import (
    PREAMBLE_SIZE,
    SET_FORMAT_VERSION,
    BodyHeader,
    Header,
    ShardHeader,
    parse_preamble_version,
)
from sealtorch.sealed.keywrap import unwrap_content_key
from sealtorch.sealed.parallel import Part, decrypt_parts, decrypt_threads
from sealtorch.sealed.sets import SetMember, open_members

__all__ = ["SealedReader", "allocate_plaintext", "read_header"]

Source = str | os.PathLike[str] | BinaryIO


#: Below this size huge pages are not worth asking for.
_HUGE_PAGE_THRESHOLD = 8 * 1024 * 1024


def allocate_plaintext(size: int) -> mmap.mmap:
    """One anonymous, page-aligned, pre-faulted buffer for a whole plaintext.

    Faulting fresh pages one by one while decrypting costs more than the decryption itself.
    Large buffers ask for transparent huge pages (``MADV_HUGEPAGE``; the kernel's default THP
    mode is often ``madvise``), which cuts the number of faults 512-fold: on the development VM a
    1 GiB load went from 2.0 to 3.8 GB/s (``benchmarks/bench_sealed.py``). Where huge pages are
    unavailable, ``MAP_POPULATE`` faults every page in one system call instead.
    """
    length = max(size, 1)
    hugepage = getattr(mmap, "MADV_HUGEPAGE", None)
    if length >= _HUGE_PAGE_THRESHOLD and hugepage is not None:
        buffer = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            buffer.madvise(hugepage)
        except OSError:
            buffer.close()
        else:
            return buffer
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(-1, length, flags=flags)


class SealedReader:
    """An open sealed file whose preamble and header have been parsed (not yet authenticated).

    The header is authenticated as a side effect of unwrapping the content key and decrypting
    the body: every public field is bound into the key wrap and the body key derivation.
    """

    def __init__(self, source: Source) -> None:
        self.path: Path | None = None
        if isinstance(source, str | os.PathLike):
            self.path = Path(source)
            try:
                self._file = cast(BinaryIO, open(self.path, "rb", buffering=0))  # noqa: SIM115
            except FileNotFoundError as exc:
                raise ConfigError(f"sealed model {self.path} does not exist") from exc
            except IsADirectoryError as exc:
                raise ConfigError(f"{self.path} is a directory, not a sealed model") from exc
            except OSError as exc:
                raise ConfigError(f"cannot read {self.path}: {exc.strerror}") from exc
            self._owned = True
        else:
            self._file = source
            self._owned = False
        self.members: list[SetMember] = []
        try:
            self.header, self.body_offset = self._read_header()
            if self.header.body.set is not None:
                if self.path is None:
                    raise ConfigError("a sealed set must be read from its files, not a stream")
                self.members = open_members(self.path, self.header)
        except BaseException:
            self.close()
            raise

    @property
    def plaintext_size(self) -> int:
        """The whole model's plaintext: this file's, plus the other files' of a sealed set."""
        return self.header.body.plaintext_size + sum(m.body.plaintext_size for m in self.members)

    @property
    def file_size(self) -> int:
        """Bytes on disk: this file's, plus the other files' of a sealed set."""
        own = len(self.header.encode()) + self.header.body.sealed_size
        return own + sum(m.file_size for m in self.members)

    def _read_header(self) -> tuple[Header, int]:
        try:
            start = self._file.tell()
            total = self._file.seek(0, io.SEEK_END) - start
            self._file.seek(start)
        except (OSError, ValueError) as exc:
            raise ConfigError("a sealed model must be read from a seekable file") from exc
        preamble = self._read_exact(min(PREAMBLE_SIZE, total))
        version, header_length = parse_preamble_version(preamble)
        if PREAMBLE_SIZE + header_length > total:
            raise IntegrityError()
        text = self._read_exact(header_length)
        try:
            header = Header.decode(text, version=version)
        except IntegrityError:
            if version != SET_FORMAT_VERSION:
                raise
            shard = ShardHeader.decode(text).body.set
            index, count = (shard.index, shard.count) if shard is not None else (0, 0)
            raise ConfigError(
                f"{self.path or 'this file'} is file {index + 1} of {count} of a "
                "sealed set: open the set's first file (the one without a .NNNNN-of-NNNNN "
                "suffix)"
            ) from None
        body_offset = PREAMBLE_SIZE + header_length
        if total - body_offset != header.body.sealed_size:
            raise IntegrityError()
        self._body_start = start + body_offset
        return header, body_offset

    def _read_exact(self, size: int) -> bytes:
        data = self._file.read(size)
        if len(data) != size:
            raise IntegrityError()
        return data

    def _readinto_exact(self, view: memoryview) -> None:
        while view:
            got = self._file.readinto(view)  # type: ignore[attr-defined]
            if not got:
                raise IntegrityError()
            view = view[got:]

    # -- keys ---------------------------------------------------------------------------------

    def content_key(self, keys: KeyProvider | DataKey) -> bytes:
        """Fetch the data key for this file and unwrap its content key (IntegrityError if wrong)."""
        dek = (
            keys
            if isinstance(keys, DataKey)
            else keys.data_key(self.header.model_id, self.header.key_version)
        )
        if not isinstance(dek, DataKey):
            raise TypeError(f"{keys!r}.data_key() must return a DataKey")
        return unwrap_content_key(dek, self.header)

    def _parts(self) -> list[tuple[BinaryIO, int, BodyHeader]]:
        """Every file of the model in order: (file, body start, body header)."""
        own = (self._file, self._body_start, self.header.body)
        return [own, *((m.file, m.body_start, m.body) for m in self.members)]

    # -- body ---------------------------------------------------------------------------------

    def iter_plaintext(self, cek: bytes) -> Iterator[memoryview]:
        """Yield each chunk's authenticated plaintext (a view into a reused buffer).

        The last chunk is only known to be genuine - and the body complete - when the iterator
        finishes without raising :class:`IntegrityError`; callers must not use the output before.
        """
        for source, start, body in self._parts():
            cipher = BodyCipher(cek, salt=body.salt, body_digest=body.digest)
            chunk = body.chunk_size
            sealed = memoryview(bytearray(chunk + TAG_SIZE))
            plain = memoryview(bytearray(chunk))
            source.seek(start)
            remaining = body.plaintext_size
            last_index = body.chunk_count - 1
            for index in range(body.chunk_count):
                size = min(chunk, remaining)
                _readinto_exact(source, sealed[: size + TAG_SIZE])
                cipher.open_into(
                    index,
                    last=index == last_index,
                    sealed=sealed[: size + TAG_SIZE],
                    out=plain[:size],
                )
                remaining -= size
                if index == last_index:
                    _check_end(source)
                yield plain[:size]

    def decrypt(
        self,
        cek: bytes,
        *,
        into: mmap.mmap | None = None,
        progress: Callable[[int, int], None] | None = None,
        threads: int | None = None,
    ) -> mmap.mmap:
        """Authenticate and decrypt the whole body into one buffer and return it.

        The buffer is new (see :func:`allocate_plaintext`) unless ``into`` - a writable buffer of
        at least ``plaintext_size`` bytes - is given to be reused. On failure a new buffer is
        released, ``into`` holds unauthenticated bytes, and nothing is returned.
        ``progress(done, total)`` is called after each chunk with plaintext bytes.

        ``threads`` decrypt in parallel (default: :func:`~sealtorch.sealed.parallel.
        decrypt_threads`, one per core); a model read from a stream without a file descriptor
        is decrypted by the calling thread.
        """
        total = self.plaintext_size
        if into is not None and len(into) < total:
            raise ValueError("the buffer is smaller than the plaintext")
        count = decrypt_threads(threads)
        parts = self.fd_parts() if count > 1 and total > self.header.body.chunk_size else None
        out = allocate_plaintext(total) if into is None else into
        target = memoryview(out)
        try:
            if parts is not None:
                decrypt_parts(parts, cek, target, threads=count, progress=progress)
                target.release()
                return out
            position = 0
            for source, start, body in self._parts():
                cipher = BodyCipher(cek, salt=body.salt, body_digest=body.digest)
                chunk = body.chunk_size
                sealed = memoryview(bytearray(min(chunk, body.plaintext_size) + TAG_SIZE))
                source.seek(start)
                open_into = cipher.open_into
                last_index = body.chunk_count - 1
                end_of_part = position + body.plaintext_size
                for index in range(body.chunk_count):
                    end = min(position + chunk, end_of_part)
                    piece = sealed[: end - position + TAG_SIZE]
                    _readinto_exact(source, piece)
                    open_into(
                        index, last=index == last_index, sealed=piece, out=target[position:end]
                    )
                    position = end
                    if progress is not None:
                        progress(position, total)
                _check_end(source)
        except BaseException:
            target.release()
            if into is None:
                out.close()
            raise
        target.release()
        return out

    def fd_parts(self) -> list[Part] | None:
        """The files as descriptors for positional reads, or None for a stream without one."""
        parts = []
        for source, start, body in self._parts():
            try:
                fd = source.fileno()
            except (AttributeError, OSError, ValueError):
                return None
            parts.append(Part(fd=fd, body_start=start, body=body))
        return parts

    def _check_end(self) -> None:
        _check_end(self._file)

    def copy_body(self, destination: BinaryIO, *, buffer_size: int = 1 << 20) -> None:
        """Copy the sealed body bytes unchanged (key rotation rewraps only the header)."""
        self._file.seek(self._body_start)
        remaining = self.header.body.sealed_size
        buffer = memoryview(bytearray(min(buffer_size, max(remaining, 1))))
        while remaining:
            piece = buffer[: min(len(buffer), remaining)]
            self._readinto_exact(piece)
            view = piece
            while view:
                written = destination.write(view)
                view = view[written:]
            remaining -= len(piece)
        self._check_end()

    def close(self) -> None:
        for member in getattr(self, "members", ()):
            member.file.close()
        if self._owned:
            self._file.close()

    def __enter__(self) -> SealedReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SealedReader({self.path or self._file!r}, model_id={self.header.model_id!r})"


def _readinto_exact(source: BinaryIO, view: memoryview) -> None:
    while view:
        got = source.readinto(view)  # type: ignore[attr-defined]
        if not got:
            raise IntegrityError()
        view = view[got:]


def _check_end(source: BinaryIO) -> None:
    if source.read(1):
        raise IntegrityError()


def read_header(source: Source) -> Header:
    """Parse a sealed file's public header without any key (nothing is authenticated).

    Raises :class:`~sealtorch.errors.FormatError` for files that are not sealed models or come
    from a newer sealtorch, :class:`~sealtorch.errors.IntegrityError` for malformed headers or
    sizes.
    """
    with SealedReader(source) as reader:
        return reader.header
