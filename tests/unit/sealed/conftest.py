"""Helpers for the sealed-format tests: seal raw plaintext bytes and try to open them again."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest

from sealtorch.keys import DataKey
from sealtorch.sealed import parallel
from sealtorch.sealed.keywrap import LocalKeyWrapper
from sealtorch.sealed.reader import SealedReader
from sealtorch.sealed.writer import SealedWriter

KEY = DataKey(bytes(range(32)))
OTHER_KEY = DataKey(bytes(range(1, 33)))


def seal(
    plaintext: bytes,
    *,
    key: DataKey = KEY,
    model_id: str = "m1",
    key_version: int = 1,
    chunk_size: int = 64,
) -> bytes:
    """Seal ``plaintext`` into an in-memory sealed file."""
    out = io.BytesIO()
    with SealedWriter(
        out,
        model_id=model_id,
        plaintext_size=len(plaintext),
        wrapper=LocalKeyWrapper(key, key_version=key_version),
        chunk_size=chunk_size,
    ) as writer:
        writer.write(plaintext)
    return out.getvalue()


def open_sealed(blob: bytes, *, key: DataKey = KEY) -> bytes:
    """Authenticate and decrypt ``blob`` fully; returns the plaintext or raises."""
    with SealedReader(io.BytesIO(blob)) as reader:
        buffer = reader.decrypt(reader.content_key(key))
        data = bytes(buffer[: reader.header.body.plaintext_size])
        buffer.close()
        return data


def open_parallel(blob: bytes, *, key: DataKey = KEY, threads: int = 3) -> bytes:
    """Like :func:`open_sealed`, from a real file, decrypted by ``threads`` threads with
    positional reads (the path every model file takes), each taking one chunk at a time."""
    with tempfile.TemporaryDirectory() as folder, mock.patch.object(parallel, "_BATCH_BYTES", 1):
        path = Path(folder) / "model.sealed"
        path.write_bytes(blob)
        with SealedReader(path) as reader:
            buffer = reader.decrypt(reader.content_key(key), threads=threads)
            data = bytes(buffer[: reader.header.body.plaintext_size])
            buffer.close()
            return data


def open_streaming(blob: bytes, *, key: DataKey = KEY) -> bytes:
    with SealedReader(io.BytesIO(blob)) as reader:
        return b"".join(bytes(piece) for piece in reader.iter_plaintext(reader.content_key(key)))


@pytest.fixture
def sealed_file(tmp_path: Path) -> Callable[..., Path]:
    def make(plaintext: bytes | None = None, **kwargs: object) -> Path:
        data = os.urandom(300) if plaintext is None else plaintext
        path = tmp_path / "model.sealed"
        path.write_bytes(seal(data, **kwargs))  # type: ignore[arg-type]
        return path

    return make
