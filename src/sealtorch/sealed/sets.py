"""Sealed sets: one model sealed into several files (format version 2, ``docs/format.md``).

A large model is sealed into a set of files - cut like the input's shards, or by a size
limit - so that each file stays a manageable size for object stores and image layers. The
set's body plaintext is the concatenation of the files' plaintexts: one manifest and payload,
exactly as a single file holds them.

Every file's body header carries ``set`` = (random set id, index, count); the first file,
which alone holds the wrapped content key, also lists the body digests of all the others. The
body digest is bound into each file's body key, and the first file's (with the list) into the
key wrap, so a file that is swapped, dropped, duplicated, edited or taken from another set (or
another sealing of the same model) is refused before any key is requested. The other files are
found next to the first: ``NAME.00002-of-00003`` for file 2 of ``NAME``.
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from sealtorch._crypto.stream import CEK_SIZE
from sealtorch.errors import ConfigError, FormatError, IntegrityError, PayloadError
from sealtorch.sealed.header import (
    BODY_SALT_SIZE,
    MAX_SET_FILES,
    PREAMBLE_SIZE,
    SET_FORMAT_VERSION,
    SET_ID_SIZE,
    BodyHeader,
    Header,
    KeyBlock,
    SetBlock,
    ShardHeader,
    parse_preamble_version,
)
from sealtorch.sealed.keywrap import ContentKeyWrapper

__all__ = [
    "SealedSetWriter",
    "SetMember",
    "member_path",
    "open_members",
    "plan_parts",
    "set_paths",
]


def member_path(first: Path, index: int, count: int) -> Path:
    """Where file ``index`` (0-based; 0 is ``first`` itself) of a set of ``count`` lives."""
    if index == 0:
        return first
    return first.with_name(f"{first.name}.{index + 1:05d}-of-{count:05d}")


def set_paths(first: Path, count: int) -> list[Path]:
    return [member_path(first, index, count) for index in range(count)]


@dataclass
class SetMember:
    """File ``index`` ≥ 1 of an open sealed set, its header checked against the first file."""

    path: Path
    file: BinaryIO
    body: BodyHeader
    body_start: int
    file_size: int


def _refuse(first: Path, index: int, count: int, problem: str) -> IntegrityError:
    return IntegrityError(
        f"sealed set {first.name}: file {index + 1} of {count} "
        f"({member_path(first, index, count).name}) {problem}; nothing was loaded"
    )


def _open_member(first: Path, header: Header, index: int) -> SetMember:
    head = header.body.set
    if head is None:  # pragma: no cover - open_members checks it
        raise ValueError("not the first file of a sealed set")
    count = head.count
    path = member_path(first, index, count)
    try:
        handle = cast(BinaryIO, open(path, "rb", buffering=0))  # noqa: SIM115
    except FileNotFoundError:
        raise _refuse(first, index, count, "is missing") from None
    except OSError as exc:
        raise _refuse(first, index, count, f"cannot be read ({exc.strerror})") from None
    try:
        total = os.fstat(handle.fileno()).st_size
        preamble = handle.read(PREAMBLE_SIZE)
        try:
            version, length = parse_preamble_version(preamble)
            if version != SET_FORMAT_VERSION or PREAMBLE_SIZE + length > total:
                raise IntegrityError()
            text = handle.read(length)
            if len(text) != length:
                raise IntegrityError()
            body = ShardHeader.decode(text).body
        except (IntegrityError, ConfigError, ValueError) as exc:
            raise _refuse(first, index, count, "is not a file of a sealed set") from exc
        except FormatError as exc:  # bad magic, another format version
            raise _refuse(first, index, count, f"is not a sealed file ({exc})") from exc
        shard = body.set
        if shard is None:  # pragma: no cover - ShardHeader requires it
            raise _refuse(first, index, count, "is not a file of a sealed set")
        if shard.set_id != head.set_id:
            raise _refuse(
                first, index, count, "belongs to another sealed set (another sealing or version)"
            )
        if shard.index != index or shard.count != count:
            raise _refuse(
                first,
                index,
                count,
                f"holds file {shard.index + 1} of {shard.count} (swapped or duplicated files)",
            )
        if body.digest != head.digests[index - 1]:
            raise _refuse(first, index, count, "does not match the digest the first file lists")
        body_start = PREAMBLE_SIZE + length
        if total - body_start != body.sealed_size:
            raise _refuse(first, index, count, "is truncated or extended")
        return SetMember(path=path, file=handle, body=body, body_start=body_start, file_size=total)
    except BaseException:
        handle.close()
        raise


def open_members(first: Path, header: Header) -> list[SetMember]:
    """Open and check files 2 … count of the set whose first file is ``first``."""
    head = header.body.set
    if head is None:
        return []
    members: list[SetMember] = []
    try:
        members.extend(_open_member(first, header, index) for index in range(1, head.count))
    except BaseException:
        for member in members:
            member.file.close()
        raise
    return members


def plan_parts(
    total: int, *, boundaries: Sequence[int] = (), max_size: int | None = None
) -> list[int]:
    """Cut a plaintext of ``total`` bytes into file sizes.

    ``boundaries`` are preferred cut points (where the input's shards end); ``max_size`` cuts
    anything longer. Returns one size per file (one file: no set).
    """
    cuts = sorted({b for b in boundaries if 0 < b < total})
    if max_size is not None:
        if max_size < 1:
            raise ConfigError("the file size limit must be positive")
        refined: list[int] = []
        previous = 0
        for cut in [*cuts, total]:
            while cut - previous > max_size:
                previous += max_size
                refined.append(previous)
            if cut < total:
                refined.append(cut)
            previous = cut
        cuts = refined
    edges = [0, *cuts, total]
    sizes = [b - a for a, b in itertools.pairwise(edges) if b > a] or [total]
    if len(sizes) > MAX_SET_FILES:
        raise ConfigError(
            f"the model would need {len(sizes)} files; a sealed set holds at most "
            f"{MAX_SET_FILES}: use a larger --max-file-size"
        )
    return sizes


class SealedSetWriter:
    """Write one plaintext stream into the files of a sealed set (at least two sizes).

    The whole set's headers are fixed first (sizes and salts are known up front), then the
    plaintext is written through, one file after the other, with the memory of one chunk.
    Nothing appears at the destination until every file is complete; then the files are put
    in place, the first file last.
    """

    def __init__(
        self,
        first: str | os.PathLike[str],
        *,
        model_id: str,
        sizes: Sequence[int],
        wrapper: ContentKeyWrapper,
        chunk_size: int,
        overwrite: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        from sealtorch.sealed.writer import SealedWriter

        if len(sizes) < 2:
            raise ValueError("a sealed set has at least two files")
        self.first = Path(first)
        count = len(sizes)
        set_id = secrets.token_bytes(SET_ID_SIZE)
        others = [
            BodyHeader(
                model_id=model_id,
                plaintext_size=size,
                chunk_size=chunk_size,
                salt=secrets.token_bytes(BODY_SALT_SIZE),
                set=SetBlock(set_id=set_id, index=index, count=count),
            )
            for index, size in enumerate(sizes[1:], start=1)
        ]
        head_body = BodyHeader(
            model_id=model_id,
            plaintext_size=sizes[0],
            chunk_size=chunk_size,
            salt=secrets.token_bytes(BODY_SALT_SIZE),
            set=SetBlock(
                set_id=set_id, index=0, count=count, digests=tuple(b.digest for b in others)
            ),
        )
        cek = secrets.token_bytes(CEK_SIZE)
        key_block = wrapper.wrap(model_id=model_id, body_digest=head_body.digest, cek=cek)
        if not isinstance(key_block, KeyBlock):
            raise ConfigError(f"key wrapper {wrapper!r} did not return a KeyBlock")
        self.header = Header(body=head_body, key=key_block)
        headers: list[Header | ShardHeader] = [
            self.header,
            *(ShardHeader(body=body) for body in others),
        ]
        self.paths = set_paths(self.first, count)
        self._writers: list[SealedWriter] = []
        try:
            for path, header in zip(self.paths, headers, strict=True):
                self._writers.append(
                    SealedWriter.prepared(
                        path, header=header, cek=cek, overwrite=overwrite, progress=progress
                    )
                )
        except BaseException:
            self.abort()
            raise
        del cek
        self._sizes = list(sizes)
        self._current = 0
        self._left = self._sizes[0]

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            while self._left == 0:
                self._current += 1
                if self._current >= len(self._writers):
                    raise PayloadError("the model produced more bytes than announced")
                self._left = self._sizes[self._current]
            take = min(self._left, len(view))
            self._writers[self._current].write(view[:take])
            self._left -= take
            view = view[take:]

    def finish(self) -> Header:
        try:
            for writer in self._writers:
                writer.finish()
            # Members first, the first file (which makes the set visible) last.
            for writer in reversed(self._writers):
                writer.commit()
        except BaseException:
            self.abort()
            raise
        return self.header

    def abort(self) -> None:
        for writer in self._writers:
            writer.abort()

    def __enter__(self) -> SealedSetWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()
