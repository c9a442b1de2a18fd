"""File master key: wrapping, AAD binding, file permissions, no secrets in repr."""

from __future__ import annotations

import logging
import os
import pickle  # noqa: TID251 - only to prove that master keys refuse pickling
import stat
from pathlib import Path

import pytest

from sealtorch.errors import ConfigError, IntegrityError
from sealtorch.keys import DataKey, generate_key
from sealtorch.keyserver import masterkey
from sealtorch.keyserver.masterkey import (
    UNWRAP_FAILED_MESSAGE,
    FileMasterKey,
    FileMasterKeyConfig,
    MasterKey,
    open_master_key,
    wrap_aad,
)


@pytest.fixture
def master(tmp_path: Path) -> FileMasterKey:
    return FileMasterKey.create(tmp_path / "master.key")


def test_round_trip_and_blob_shape(master: FileMasterKey) -> None:
    dek = generate_key()
    aad = wrap_aad("resnet50", 1)
    blob = master.wrap(dek, aad)
    assert len(blob) == 61
    assert blob[0] == 0x01
    assert dek.material not in blob
    assert master.unwrap(blob, aad) == dek
    assert isinstance(master, MasterKey)


def test_wrapping_is_randomised(master: FileMasterKey) -> None:
    dek = generate_key()
    aad = wrap_aad("m", 1)
    assert master.wrap(dek, aad) != master.wrap(dek, aad)


def test_raw_bytes_are_accepted_and_checked(master: FileMasterKey) -> None:
    dek = generate_key()
    blob = master.wrap(dek.material, wrap_aad("m", 1))
    assert master.unwrap(blob, wrap_aad("m", 1)) == dek
    with pytest.raises(ValueError, match="32 bytes"):
        master.wrap(b"short", wrap_aad("m", 1))


def test_blob_moved_to_another_model_or_version_fails(master: FileMasterKey) -> None:
    """An attacker with database access copies a wrapped DEK into another row."""
    blob = master.wrap(generate_key(), wrap_aad("model-a", 2))
    for other in (wrap_aad("model-b", 2), wrap_aad("model-a", 1), wrap_aad("model-a", 3)):
        with pytest.raises(IntegrityError, match="wrapped data key failed authentication"):
            master.unwrap(blob, other)


def test_every_tampered_byte_fails_identically(master: FileMasterKey) -> None:
    aad = wrap_aad("m", 1)
    blob = master.wrap(generate_key(), aad)
    messages = set()
    for index in range(len(blob)):
        tampered = bytearray(blob)
        tampered[index] ^= 0x80
        with pytest.raises(IntegrityError) as info:
            master.unwrap(bytes(tampered), aad)
        messages.add(str(info.value))
    for bad in (b"", blob[:-1], blob + b"\x00"):
        with pytest.raises(IntegrityError) as info:
            master.unwrap(bad, aad)
        messages.add(str(info.value))
    assert messages == {UNWRAP_FAILED_MESSAGE}


def test_another_master_key_cannot_unwrap(master: FileMasterKey, tmp_path: Path) -> None:
    other = FileMasterKey.create(tmp_path / "other.key")
    assert other.key_id != master.key_id
    blob = master.wrap(generate_key(), wrap_aad("m", 1))
    with pytest.raises(IntegrityError):
        other.unwrap(blob, wrap_aad("m", 1))


def test_reload_gives_the_same_key(master: FileMasterKey) -> None:
    assert master.path is not None
    again = FileMasterKey.load(master.path)
    assert again.key_id == master.key_id
    dek = generate_key()
    assert again.unwrap(master.wrap(dek, wrap_aad("m", 7)), wrap_aad("m", 7)) == dek


def test_file_is_0600_and_never_overwritten(master: FileMasterKey) -> None:
    assert master.path is not None
    assert stat.S_IMODE(master.path.stat().st_mode) == 0o600
    before = master.path.read_bytes()
    with pytest.raises(ConfigError, match="never overwritten"):
        FileMasterKey.create(master.path)
    assert master.path.read_bytes() == before


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o666])
def test_file_readable_by_others_is_refused(master: FileMasterKey, mode: int) -> None:
    assert master.path is not None
    master.path.chmod(mode)
    with pytest.raises(ConfigError, match="chmod 600"):
        FileMasterKey.load(master.path)


def test_symlink_to_private_file_is_followed_and_checked(
    master: FileMasterKey, tmp_path: Path
) -> None:
    assert master.path is not None
    link = tmp_path / "link.key"
    link.symlink_to(master.path)
    assert FileMasterKey.load(link).key_id == master.key_id
    master.path.chmod(0o644)
    with pytest.raises(ConfigError, match="accessible by other users"):
        FileMasterKey.load(link)


def test_missing_damaged_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        FileMasterKey.load(tmp_path / "nope.key")
    cases = {
        "foreign.key": "sealtorch-data-key-v1:AAAA",
        "base64.key": masterkey.MASTER_KEY_FILE_PREFIX + "!!!!",
        "short.key": masterkey.MASTER_KEY_FILE_PREFIX + "AAAA",
    }
    for name, text in cases.items():
        path = tmp_path / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        with pytest.raises(ConfigError, match=r"not a sealtorch master key|damaged"):
            FileMasterKey.load(path)
    binary = tmp_path / "binary.key"
    fd = os.open(binary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as raw:
        raw.write(b"\xff\xfe" * 10)
    with pytest.raises(ConfigError, match="not a sealtorch master key"):
        FileMasterKey.load(binary)
    with pytest.raises(ConfigError, match="not a regular file"):
        FileMasterKey.load(tmp_path)


def test_secret_never_in_repr_or_logs(
    master: FileMasterKey, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    assert master.path is not None
    secret_text = master.path.read_text().strip().split(":", 1)[1]
    again = FileMasterKey.load(master.path)
    again.unwrap(again.wrap(generate_key(), wrap_aad("m", 1)), wrap_aad("m", 1))
    text = repr(master) + str(master) + caplog.text
    assert secret_text not in text
    assert "<redacted>" in repr(master)
    with pytest.raises(TypeError):
        pickle.dumps(master)


def test_wrap_aad_is_unambiguous_and_validated() -> None:
    assert wrap_aad("a", 1) != wrap_aad("a", 2)
    assert wrap_aad("ab", 1) != wrap_aad("a", 1)
    assert wrap_aad("m", 256) != wrap_aad("m\x00", 1)
    for model_id, version in (("", 1), ("m", 0), ("m", -1), ("m", 2**32), ("m", True)):
        with pytest.raises(ValueError):
            wrap_aad(model_id, version)  # type: ignore[arg-type]


def test_open_master_key_from_config(tmp_path: Path) -> None:
    config = FileMasterKeyConfig(path=tmp_path / "mk")
    created = open_master_key(config, create=True)
    opened = open_master_key(config)
    dek = DataKey(b"\x07" * 32)
    assert opened.unwrap(created.wrap(dek, wrap_aad("m", 1)), wrap_aad("m", 1)) == dek
    opened.close()
