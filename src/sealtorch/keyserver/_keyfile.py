"""Secret key files of the key server (development keys): created 0600, read only when 0600.

One format for every such file — a prefix naming the kind and version, then the key in
base64url without padding, one line — and one set of checks: never overwrite, never follow a
symbolic link when creating, refuse a file that group or others can access (it is the key), a
FIFO or a directory, a damaged or foreign file. Used by the file master key and the file
release-signing key.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from sealtorch.errors import ConfigError

__all__ = ["SecretFileKind", "create_secret_file", "read_secret_file"]


@dataclass(frozen=True)
class SecretFileKind:
    """What a kind of key file is, for its checks and messages."""

    #: First characters of the file, e.g. ``sealtorch-master-key-v1:``.
    prefix: str
    #: Name in messages, e.g. ``master key``.
    what: str
    #: Secret size in bytes.
    size: int
    #: Why it is never overwritten (e.g. ``every wrapped data key depends on it``).
    never_overwritten: str
    #: What it protects (e.g. ``it protects every model key``).
    protects: str
    #: What to do when it is missing.
    missing_hint: str


def create_secret_file(path: str | os.PathLike[str], secret: bytes, kind: SecretFileKind) -> Path:
    """Write ``secret`` to the new file ``path`` (mode 0600); never overwrites."""
    target = Path(path)
    text = kind.prefix + base64.urlsafe_b64encode(secret).decode().rstrip("=")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(target, flags, 0o600)
    except FileExistsError as exc:
        raise ConfigError(
            f"{target} already exists; a {kind.what} file is never overwritten "
            f"({kind.never_overwritten})"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"cannot create {kind.what} file {target}: {exc.strerror}") from exc
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(text + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return target


def read_secret_file(path: str | os.PathLike[str], kind: SecretFileKind) -> bytes:
    """The secret in the key file ``path``; refuses one that other users can access."""
    source = Path(path)
    try:
        if not stat.S_ISREG(source.stat().st_mode):  # a FIFO would block open()
            raise ConfigError(f"{kind.what} {source} is not a regular file")
        with open(source, encoding="ascii") as handle:
            info = os.fstat(handle.fileno())
            text = handle.read(4096)
    except FileNotFoundError as exc:
        raise ConfigError(f"{kind.what} file {source} does not exist; {kind.missing_hint}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source} is not a sealtorch {kind.what} file") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {kind.what} file {source}: {exc.strerror}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{kind.what} {source} is not a regular file")
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise ConfigError(
            f"{kind.what} file {source} is accessible by other users "
            f"(mode {stat.S_IMODE(info.st_mode):o}); {kind.protects}, so "
            f"sealtorch refuses to use it. Run `chmod 600 {source}`"
        )
    text = text.strip()
    if not text.startswith(kind.prefix):
        raise ConfigError(
            f"{source} is not a sealtorch {kind.what} file (it must start with {kind.prefix!r})"
        )
    body = text[len(kind.prefix) :]
    try:
        secret = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"{kind.what} file {source} is damaged (bad base64)") from exc
    if len(secret) != kind.size:
        raise ConfigError(f"{kind.what} file {source} is damaged (wrong key length)")
    return secret
