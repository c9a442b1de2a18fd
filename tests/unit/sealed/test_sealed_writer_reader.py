from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from conftest import KEY, open_sealed, open_streaming, seal
from sealtorch._crypto.stream import BodyCipher
from sealtorch.errors import ConfigError, IntegrityError, PayloadError
from sealtorch.keys import DataKey
from sealtorch.sealed._atomic import AtomicFile
from sealtorch.sealed.header import KeyBlock
from sealtorch.sealed.keywrap import (
    ContentKeyWrapper,
    LocalKeyWrapper,
    unwrap_content_key,
    wrap_content_key,
)
from sealtorch.sealed.reader import SealedReader, allocate_plaintext, read_header
from sealtorch.sealed.writer import SealedWriter


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 127, 128, 129, 1000])
def test_round_trip_sizes_around_chunk_boundaries(size: int) -> None:
    data = os.urandom(size)
    blob = seal(data, chunk_size=64)
    assert open_sealed(blob) == data
    assert open_streaming(blob) == data
    chunks = max(1, -(-size // 64))
    assert len(blob) == len(read_header(io.BytesIO(blob)).encode()) + size + 16 * chunks


def test_pieces_of_any_size_give_identical_plaintext() -> None:
    data = os.urandom(1000)
    out = io.BytesIO()
    with SealedWriter(
        out, model_id="m", plaintext_size=1000, wrapper=LocalKeyWrapper(KEY), chunk_size=64
    ) as writer:
        for start, end in [(0, 1), (1, 64), (64, 300), (300, 301), (301, 1000)]:
            writer.write(memoryview(data)[start:end])
    assert open_sealed(out.getvalue()) == data


def test_each_file_has_a_fresh_content_key_and_salts() -> None:
    a, b = seal(b"same"), seal(b"same")
    assert a != b
    ha, hb = read_header(io.BytesIO(a)), read_header(io.BytesIO(b))
    assert ha.body.salt != hb.body.salt
    assert ha.key.salt != hb.key.salt
    assert ha.key.nonce != hb.key.nonce
    assert unwrap_content_key(KEY, ha) != unwrap_content_key(KEY, hb)


def test_writer_to_path_is_atomic_and_refuses_to_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "m.sealed"
    with SealedWriter(target, model_id="m", plaintext_size=3, wrapper=LocalKeyWrapper(KEY)) as w:
        w.write(b"abc")
        assert not target.exists()  # nothing visible until committed
    assert oct(target.stat().st_mode & 0o777) == "0o644"
    with pytest.raises(ConfigError, match="already exists"):
        SealedWriter(target, model_id="m", plaintext_size=3, wrapper=LocalKeyWrapper(KEY))
    with SealedWriter(
        target, model_id="m", plaintext_size=2, wrapper=LocalKeyWrapper(KEY), overwrite=True
    ) as w:
        w.write(b"xy")
    with SealedReader(target) as reader:
        assert bytes(reader.decrypt(reader.content_key(KEY))[:2]) == b"xy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.sealed"]


def test_writer_failure_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "m.sealed"

    def fail() -> None:
        with SealedWriter(
            target, model_id="m", plaintext_size=10, wrapper=LocalKeyWrapper(KEY)
        ) as w:
            w.write(b"abc")
            raise RuntimeError("source failed")

    with pytest.raises(RuntimeError):
        fail()
    assert list(tmp_path.iterdir()) == []


def test_writer_checks_the_announced_size(tmp_path: Path) -> None:
    target = tmp_path / "m.sealed"
    writer = SealedWriter(target, model_id="m", plaintext_size=3, wrapper=LocalKeyWrapper(KEY))
    with pytest.raises(PayloadError, match="more bytes than announced"):
        writer.write(b"abcd")
    writer.abort()
    with (
        pytest.raises(PayloadError, match="2 bytes but 3 were announced"),
        SealedWriter(
            target, model_id="m", plaintext_size=3, wrapper=LocalKeyWrapper(KEY)
        ) as writer,
    ):
        writer.write(b"ab")
    assert list(tmp_path.iterdir()) == []


def test_remote_style_wrapper_protocol() -> None:
    calls: list[tuple[str, bytes]] = []

    class Remote:
        """What a key server client does: wrap without revealing the data key to the caller."""

        def wrap(self, *, model_id: str, body_digest: bytes, cek: bytes) -> KeyBlock:
            calls.append((model_id, body_digest))
            return wrap_content_key(
                KEY, model_id=model_id, key_version=7, body_digest=body_digest, cek=cek
            )

    assert isinstance(Remote(), ContentKeyWrapper)
    out = io.BytesIO()
    with SealedWriter(out, model_id="m", plaintext_size=1, wrapper=Remote()) as writer:
        writer.write(b"z")
    header = read_header(io.BytesIO(out.getvalue()))
    assert header.key_version == 7
    assert calls == [("m", header.body.digest)]
    assert open_sealed(out.getvalue()) == b"z"


def test_wrapper_returning_garbage_is_refused() -> None:
    class Broken:
        def wrap(self, *, model_id: str, body_digest: bytes, cek: bytes) -> object:
            return {"wrapped": cek}

    with pytest.raises(ConfigError, match="did not return a KeyBlock"):
        SealedWriter(io.BytesIO(), model_id="m", plaintext_size=1, wrapper=Broken())  # type: ignore[arg-type]


def test_file_growing_while_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "m.sealed"
    path.write_bytes(seal(os.urandom(500)))
    with SealedReader(path) as reader:
        cek = reader.content_key(KEY)
        with path.open("ab") as handle:
            handle.write(b"appended after the size check")
        with pytest.raises(IntegrityError):
            reader.decrypt(cek)
        with pytest.raises(IntegrityError):
            b"".join(reader.iter_plaintext(cek))


def test_file_shrinking_while_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "m.sealed"
    path.write_bytes(seal(os.urandom(500)))
    with SealedReader(path) as reader:
        cek = reader.content_key(KEY)
        os.truncate(path, path.stat().st_size - 100)
        with pytest.raises(IntegrityError):
            reader.decrypt(cek)


def test_reader_errors_for_paths(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        SealedReader(tmp_path / "missing.sealed")
    with pytest.raises(ConfigError, match="is a directory"):
        SealedReader(tmp_path)


def test_copy_body_is_byte_identical(tmp_path: Path) -> None:
    blob = seal(os.urandom(777))
    out = io.BytesIO()
    with SealedReader(io.BytesIO(blob)) as reader:
        reader.copy_body(out, buffer_size=100)
        assert out.getvalue() == blob[reader.body_offset :]


def test_allocate_plaintext_is_writable_and_sized() -> None:
    buffer = allocate_plaintext(10_000)
    assert len(buffer) == 10_000
    buffer[9999] = 7
    assert buffer[9999] == 7
    assert len(allocate_plaintext(0)) == 1


def test_atomic_file_abort_and_commit(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    with AtomicFile(target) as handle:
        handle.write(b"data")
    assert target.read_bytes() == b"data"
    handle = AtomicFile(target, overwrite=True)
    handle.write(b"new")
    handle.abort()
    assert target.read_bytes() == b"data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    with pytest.raises(ConfigError, match="does not exist"):
        AtomicFile(tmp_path / "no" / "such" / "dir.bin")


def test_atomic_file_never_overwrites_a_file_created_meanwhile(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    handle = AtomicFile(target)
    handle.write(b"mine")
    target.write_bytes(b"someone else's")
    with pytest.raises(ConfigError, match="appeared while"):
        handle.commit()
    assert target.read_bytes() == b"someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_keys_never_in_reprs() -> None:
    key = DataKey(os.urandom(32))
    out = io.BytesIO()
    writer = SealedWriter(out, model_id="m", plaintext_size=0, wrapper=LocalKeyWrapper(key))
    writer.finish()
    body = writer.header.body
    cipher = BodyCipher(key.material, salt=body.salt, body_digest=body.digest)  # the writer's kind
    for text in (repr(writer), repr(LocalKeyWrapper(key)), repr(cipher)):
        assert key.material.hex() not in text
        assert repr(key.material) not in text
    with SealedReader(io.BytesIO(out.getvalue())) as reader:
        assert "m" in repr(reader)
