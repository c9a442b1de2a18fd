"""Model data keys and key files: permissions, parsing, and never showing the key."""

from __future__ import annotations

import base64
import logging
import os
import pickle  # noqa: TID251 - only to prove that keys refuse to be pickled
import stat
from pathlib import Path

import pytest

from sealtorch.errors import ConfigError, KeyAccessError
from sealtorch.keys import (
    KEY_FILE_PREFIX,
    DataKey,
    KeyFile,
    KeyProvider,
    StaticKey,
    as_key_provider,
    decode_key,
    encode_key,
    generate_key,
    read_key_file,
    write_key_file,
)


def _forms(key: DataKey) -> list[str]:
    return [
        key.material.hex(),
        base64.urlsafe_b64encode(key.material).decode().rstrip("="),
        repr(key.material),
    ]


def test_keygen_file_is_0600_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "model.key"
    key = write_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().startswith(KEY_FILE_PREFIX)
    assert read_key_file(path) == key
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="never overwrites"):
        write_key_file(path)
    assert path.read_bytes() == before


def test_keygen_refuses_to_follow_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    link = tmp_path / "model.key"
    link.symlink_to(victim)
    with pytest.raises(ConfigError):
        write_key_file(link)
    assert not victim.exists()


def test_wide_permissions_warn_without_showing_the_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "model.key"
    key = write_key_file(path)
    with caplog.at_level(logging.WARNING):
        read_key_file(path)
    assert caplog.records == []
    for mode in (0o640, 0o644, 0o604):
        path.chmod(mode)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert read_key_file(path) == key
        assert "chmod 600" in caplog.text
        for form in _forms(key):
            assert form not in caplog.text


def test_repr_str_and_errors_never_show_the_key(tmp_path: Path) -> None:
    key = generate_key()
    for text in (repr(key), str(key), repr(StaticKey(key)), repr(KeyFile(tmp_path / "k"))):
        for form in _forms(key):
            assert form not in text
    assert key.fingerprint in repr(key)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(key)


def test_damaged_key_files_do_not_echo_their_content(tmp_path: Path) -> None:
    material = os.urandom(31)
    text = KEY_FILE_PREFIX + base64.urlsafe_b64encode(material).decode().rstrip("=")
    with pytest.raises(KeyAccessError, match="does not hold a 256-bit key") as info:
        decode_key(text)
    assert text[len(KEY_FILE_PREFIX) :] not in str(info.value)
    with pytest.raises(KeyAccessError, match="not a sealtorch key file"):
        decode_key("AAAA")
    with pytest.raises(KeyAccessError, match="not valid base64"):
        decode_key(KEY_FILE_PREFIX + "A")


def test_stray_characters_in_a_key_file_are_refused() -> None:
    """base64 decoders silently skip characters outside the alphabet; key files must not."""
    text = encode_key(generate_key())
    body = text[len(KEY_FILE_PREFIX) :]
    for damaged in (body[:10] + "@!" + body[10:], body[:5] + " " + body[5:], body + "*"):
        with pytest.raises(KeyAccessError, match="not valid base64"):
            decode_key(KEY_FILE_PREFIX + damaged)


def test_only_the_written_spelling_of_a_key_is_accepted() -> None:
    """43 base64url characters, no padding, the last character's 2 unused bits zero."""
    text = encode_key(DataKey(bytes(32)))
    assert text == KEY_FILE_PREFIX + "A" * 43
    for other in (text + "=", KEY_FILE_PREFIX + "A" * 42 + "B", text + "\x0c"):
        with pytest.raises(KeyAccessError, match="not valid base64"):
            decode_key(other)
    assert decode_key(" \t" + text + "\r\n") == DataKey(bytes(32))


def test_key_file_read_errors(tmp_path: Path) -> None:
    with pytest.raises(KeyAccessError, match="does not exist"):
        read_key_file(tmp_path / "missing.key")
    binary = tmp_path / "binary.key"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(KeyAccessError, match="not a sealtorch key file"):
        read_key_file(binary)
    padded = tmp_path / "padded.key"
    padded.write_text(encode_key(generate_key()) + " " * 5000 + "junk")
    with pytest.raises(KeyAccessError, match="too large"):
        read_key_file(padded)


def test_encode_decode_round_trip() -> None:
    key = generate_key()
    assert decode_key(encode_key(key)) == key
    assert decode_key("  " + encode_key(key) + "\n") == key
    assert generate_key() != key


def test_data_key_size_and_type() -> None:
    with pytest.raises(KeyAccessError, match="exactly 32 bytes"):
        DataKey(b"short")
    with pytest.raises(TypeError):
        DataKey("not bytes")  # type: ignore[arg-type]
    assert DataKey(bytearray(32)) == DataKey(bytes(32))


def test_as_key_provider_accepts_what_users_pass(tmp_path: Path) -> None:
    key = generate_key()
    path = tmp_path / "k.key"
    write_key_file(path, key)
    for value in (key, key.material, bytearray(key.material), str(path), path):
        provider = as_key_provider(value)
        assert isinstance(provider, KeyProvider)
        assert provider.data_key("m", 1) == key
    static = StaticKey(key)
    assert as_key_provider(static) is static
    with pytest.raises(TypeError, match="key must be"):
        as_key_provider(3)  # type: ignore[arg-type]


def test_static_key_restrictions() -> None:
    key = generate_key()
    restricted = StaticKey(key, model_id="resnet50", key_version=2)
    assert restricted.data_key("resnet50", 2) == key
    with pytest.raises(KeyAccessError, match="for model 'resnet50'"):
        restricted.data_key("other", 2)
    with pytest.raises(KeyAccessError, match="needs version 3"):
        restricted.data_key("resnet50", 3)
