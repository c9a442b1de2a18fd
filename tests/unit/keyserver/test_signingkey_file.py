"""The file release-signing key (development) and its commands: created 0600 next to its public
key by ``keyserver init``, refused when others can read it, never overwritten, never shown; and
``sealtorch keyserver signing-key show/create``."""

from __future__ import annotations

import pickle  # noqa: TID251 - only to prove the key refuses it
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from sealtorch._crypto.sign import ed25519_verify
from sealtorch.cli import cli
from sealtorch.errors import ConfigError
from sealtorch.keyserver.settings import CONFIG_FILE
from sealtorch.keyserver.signingkey import (
    FileReleaseSigningKey,
    FileSigningKeyConfig,
    open_signing_key,
)
from sealtorch.protocol import ReleasePublicKey


def test_create_load_sign(tmp_path: Path) -> None:
    created = FileReleaseSigningKey.create(tmp_path / "release-signing.key")
    assert stat.S_IMODE((tmp_path / "release-signing.key").stat().st_mode) == 0o600
    public = (tmp_path / "release-signing.pub").read_text().strip()
    assert ReleasePublicKey.parse(public) == created.public_key
    loaded = FileReleaseSigningKey.load(tmp_path / "release-signing.key")
    assert loaded.key_id == created.key_id
    assert loaded.in_process
    signature = loaded.sign(b"message")
    ed25519_verify(created.public_key.raw, signature, b"message")
    assert open_signing_key(FileSigningKeyConfig(tmp_path / "release-signing.key")).key_id == (
        created.key_id
    )


def test_the_secret_never_shows(tmp_path: Path) -> None:
    key = FileReleaseSigningKey.create(tmp_path / "k.key")
    seed_text = (tmp_path / "k.key").read_text().strip().split(":", 1)[1]
    assert seed_text not in repr(key)
    assert key.key_id in repr(key)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(key)


def test_refusals(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    FileReleaseSigningKey.create(path)
    with pytest.raises(ConfigError, match="never overwritten"):
        FileReleaseSigningKey.create(path)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        FileReleaseSigningKey.load(path)
    with pytest.raises(ConfigError, match="signing-key create"):
        FileReleaseSigningKey.load(tmp_path / "missing.key")
    other = tmp_path / "master.key"
    other.write_text("sealtorch-master-key-v1:" + "A" * 43 + "\n")
    other.chmod(0o600)
    with pytest.raises(ConfigError, match="not a sealtorch release-signing key file"):
        FileReleaseSigningKey.load(other)


def test_init_show_and_create(tmp_path: Path) -> None:
    data = tmp_path / "ks"
    runner = CliRunner()
    init = runner.invoke(cli, ["keyserver", "init", str(data)])
    assert init.exit_code == 0, init.output
    public = (data / "release-signing.pub").read_text().strip()
    assert public in init.output  # printed once at init, to be pinned
    assert stat.S_IMODE((data / "release-signing.key").stat().st_mode) == 0o600
    shown = runner.invoke(cli, ["keyserver", "signing-key", "show", str(data)])
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.strip() == public  # stdout is the key alone: $(...) pins it
    assert ReleasePublicKey.parse(public).key_id in shown.stderr

    # the configured key exists: create refuses; a new one for a rollover is created beside it
    again = runner.invoke(cli, ["keyserver", "signing-key", "create", str(data)])
    assert again.exit_code == 2
    assert "never overwritten" in again.output
    new_path = data / "release-signing-2.key"
    rolled = runner.invoke(
        cli, ["keyserver", "signing-key", "create", str(data), "--path", str(new_path)]
    )
    assert rolled.exit_code == 0, rolled.output
    new_public = rolled.stdout.strip()
    assert new_public != public
    assert (data / "release-signing-2.pub").read_text().strip() == new_public
    assert "not used yet" in rolled.stderr
    assert f'path = "{new_path}"' in rolled.stderr
    # still the old one until the configuration names the new one
    shown = runner.invoke(cli, ["keyserver", "signing-key", "show", str(data)])
    assert shown.stdout.strip() == public
    wrong = runner.invoke(
        cli, ["keyserver", "signing-key", "create", str(data), "--key-label", "x"]
    )
    assert wrong.exit_code == 2
    assert "give a new file path" in wrong.output


def test_a_data_directory_from_before_release_statements(tmp_path: Path) -> None:
    """No [signing_key] section and no key file: the server refuses to start and says how to
    create the key; `signing-key create` does, and the server then has one."""
    data = tmp_path / "ks"
    runner = CliRunner()
    assert runner.invoke(cli, ["keyserver", "init", str(data)]).exit_code == 0
    config = data / CONFIG_FILE
    text = config.read_text()
    start = text.index("[signing_key]")
    config.write_text(text[:start] + text[text.index("[tls]") :])
    (data / "release-signing.key").unlink()
    (data / "release-signing.pub").unlink()
    refused = runner.invoke(cli, ["keyserver", "serve", str(data), "--port", "0"])
    assert refused.exit_code == 2
    assert "keyserver signing-key create" in refused.output
    created = runner.invoke(cli, ["keyserver", "signing-key", "create", str(data)])
    assert created.exit_code == 0, created.output
    assert "uses it from its next start" in created.stderr
    assert (data / "release-signing.pub").read_text().strip() == created.stdout.strip()
