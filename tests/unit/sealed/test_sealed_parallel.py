"""Decryption on several threads (``sealtorch.sealed.parallel``): the same plaintext and the same
refusals as one thread, whatever the number of threads and however the chunks fall to them."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from unittest import mock

import pytest

from conftest import KEY, seal
from sealtorch.errors import ConfigError, IntegrityError
from sealtorch.sealed import parallel
from sealtorch.sealed.keywrap import LocalKeyWrapper
from sealtorch.sealed.reader import SealedReader
from sealtorch.sealed.sets import SealedSetWriter

CHUNK = 256
PLAINTEXT = os.urandom(97 * CHUNK + 41)


@pytest.fixture(autouse=True)
def _one_chunk_per_batch() -> object:
    with mock.patch.object(parallel, "_BATCH_BYTES", 1):
        yield


def _write(tmp_path: Path, blob: bytes) -> Path:
    path = tmp_path / "model.sealed"
    path.write_bytes(blob)
    return path


def _decrypt(path: Path, **kwargs: object) -> bytes:
    with SealedReader(path) as reader:
        buffer = reader.decrypt(reader.content_key(KEY), **kwargs)  # type: ignore[arg-type]
        try:
            return bytes(buffer[: reader.plaintext_size])
        finally:
            buffer.close()


@pytest.mark.parametrize("threads", [1, 2, 5, 16])
def test_same_plaintext_for_any_thread_count(tmp_path: Path, threads: int) -> None:
    path = _write(tmp_path, seal(PLAINTEXT, chunk_size=CHUNK))
    assert _decrypt(path, threads=threads) == PLAINTEXT


def test_a_sealed_set_on_several_threads(tmp_path: Path) -> None:
    sizes = [CHUNK * 10 + 3, CHUNK * 40, len(PLAINTEXT) - CHUNK * 50 - 3]
    writer = SealedSetWriter(
        tmp_path / "set.sealed",
        model_id="m1",
        sizes=sizes,
        wrapper=LocalKeyWrapper(KEY, key_version=1),
        chunk_size=CHUNK,
    )
    with writer:
        writer.write(PLAINTEXT)
    assert _decrypt(tmp_path / "set.sealed", threads=4) == PLAINTEXT


def test_progress_is_reported_by_the_calling_thread(tmp_path: Path) -> None:
    path = _write(tmp_path, seal(PLAINTEXT, chunk_size=CHUNK))
    calls: list[tuple[int, int, threading.Thread]] = []
    _decrypt(
        path, threads=4, progress=lambda d, t: calls.append((d, t, threading.current_thread()))
    )
    assert [d for d, _, _ in calls] == sorted(d for d, _, _ in calls)
    assert calls[-1][:2] == (len(PLAINTEXT), len(PLAINTEXT))
    assert {thread for _, _, thread in calls} == {threading.main_thread()}


@pytest.mark.parametrize("chunk", [0, 40, 97])
def test_a_tampered_chunk_fails_on_several_threads(tmp_path: Path, chunk: int) -> None:
    blob = bytearray(seal(PLAINTEXT, chunk_size=CHUNK))
    body_start = len(blob) - (len(PLAINTEXT) + 98 * 16)
    blob[body_start + chunk * (CHUNK + 16) + 5] ^= 1
    path = _write(tmp_path, bytes(blob))
    with pytest.raises(IntegrityError):
        _decrypt(path, threads=4)


def test_a_failure_stops_the_other_threads(tmp_path: Path) -> None:
    blob = bytearray(seal(PLAINTEXT, chunk_size=CHUNK))
    body_start = len(blob) - (len(PLAINTEXT) + 98 * 16)
    blob[body_start + 5] ^= 1  # the first chunk
    path = _write(tmp_path, bytes(blob))
    opened: list[int] = []
    real = parallel.BodyCipher.open_into

    def counting(self: object, index: int, **kwargs: object) -> None:
        opened.append(index)
        if index:
            time.sleep(0.01)  # the good chunks are slow: the failure comes first
        real(self, index, **kwargs)  # type: ignore[arg-type]

    with (
        mock.patch.object(parallel.BodyCipher, "open_into", counting),
        pytest.raises(IntegrityError),
    ):
        _decrypt(path, threads=2)
    assert len(opened) < 98  # stopped early, not every chunk tried


def test_file_changed_after_it_was_opened(tmp_path: Path) -> None:
    blob = seal(PLAINTEXT, chunk_size=CHUNK)
    path = _write(tmp_path, blob)
    for change in (blob + b"\x00", blob[:-CHUNK]):  # appended; truncated after the header check
        with SealedReader(path) as reader:
            cek = reader.content_key(KEY)
            path.write_bytes(change)
            with pytest.raises(IntegrityError):
                reader.decrypt(cek, threads=3)
        path.write_bytes(blob)


def test_thread_count_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(parallel.DECRYPT_THREADS_ENV, raising=False)
    assert 1 <= parallel.decrypt_threads() <= 16
    assert parallel.decrypt_threads(3) == 3
    monkeypatch.setenv(parallel.DECRYPT_THREADS_ENV, "5")
    assert parallel.decrypt_threads() == 5
    for bad in ("0", "-2", "many"):
        monkeypatch.setenv(parallel.DECRYPT_THREADS_ENV, bad)
        with pytest.raises(
            ConfigError, match=parallel.DECRYPT_THREADS_ENV if bad == "many" else "one"
        ):
            parallel.decrypt_threads()
    with pytest.raises(ConfigError):
        parallel.decrypt_threads(0)
