"""Model data keys and the key-provider interface.

A *data key* (DEK) is the 256-bit key of one version of one model. Sealed files are not
encrypted under it directly: each file has its own random content key, wrapped under the data
key (see ``docs/format.md``). Whoever can produce the data key for ``(model_id, key_version)``
can open the file.

Where the data key comes from is a :class:`KeyProvider`:

* raw ``bytes`` or a :class:`DataKey` (tests, notebooks),
* :class:`KeyFile`, a key file written by ``sealtorch keygen`` (the model owner's machine),
* an attested key release client (``sealtorch.client``) talking to a key server or key cache
  from inside an enclave.

Data keys never appear in ``repr``, logs or error messages; their :attr:`DataKey.fingerprint`
(a one-way digest) is safe to show.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Protocol, runtime_checkable

from sealtorch.errors import ConfigError, KeyAccessError

__all__ = [
    "KEY_FILE_PREFIX",
    "KEY_SIZE",
    "DataKey",
    "KeyFile",
    "KeyProvider",
    "StaticKey",
    "as_key_provider",
    "generate_key",
    "read_key_file",
    "write_key_file",
]

_log = logging.getLogger(__name__)

KEY_SIZE = 32
KEY_FILE_PREFIX = "sealtorch-data-key-v1:"
_MAX_KEY_FILE = 4096


class DataKey:
    """A 256-bit model data key. Its bytes never show in ``repr`` or ``str``."""

    __slots__ = ("_material",)

    def __init__(self, material: bytes) -> None:
        if not isinstance(material, bytes | bytearray | memoryview):
            raise TypeError("a data key is 32 raw bytes")
        material = bytes(material)
        if len(material) != KEY_SIZE:
            raise KeyAccessError(
                f"a data key is exactly {KEY_SIZE} bytes (256 bits), not {len(material)}; "
                "create one with `sealtorch keygen`"
            )
        self._material = material

    @property
    def material(self) -> bytes:
        """The raw key bytes. Handle with care: never log, print or persist them in the clear."""
        return self._material

    @property
    def fingerprint(self) -> str:
        """A short one-way identifier of the key, safe to display and log."""
        digest = hashlib.sha256(b"sealtorch/v1/key-fingerprint\x00" + self._material).digest()
        return digest[:8].hex()

    def __repr__(self) -> str:
        return f"DataKey(<redacted>, fingerprint={self.fingerprint})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DataKey):
            return NotImplemented
        return hmac.compare_digest(self._material, other._material)

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("data keys cannot be pickled")


def generate_key() -> DataKey:
    """A fresh random data key from the operating system's CSPRNG."""
    return DataKey(secrets.token_bytes(KEY_SIZE))


@runtime_checkable
class KeyProvider(Protocol):
    """Anything that can produce the data key of a model version.

    Implementations raise :class:`~sealtorch.errors.KeyAccessError` (or, for attested release,
    :class:`~sealtorch.errors.KeyReleaseError`) when they cannot.
    """

    def data_key(self, model_id: str, key_version: int) -> DataKey:
        """Return the data key of ``model_id`` at ``key_version``."""
        ...


class StaticKey:
    """A key provider holding one data key, optionally restricted to one model/version.

    Without restrictions the key is offered for every request; a wrong key then fails
    authentication like any other mismatch.
    """

    def __init__(
        self,
        key: DataKey | bytes,
        *,
        model_id: str | None = None,
        key_version: int | None = None,
    ) -> None:
        self._key = key if isinstance(key, DataKey) else DataKey(key)
        self._model_id = model_id
        self._key_version = key_version

    @property
    def key(self) -> DataKey:
        return self._key

    def data_key(self, model_id: str, key_version: int) -> DataKey:
        if self._model_id is not None and model_id != self._model_id:
            raise KeyAccessError(
                f"this key is for model {self._model_id!r}, but the file is model {model_id!r}"
            )
        if self._key_version is not None and key_version != self._key_version:
            raise KeyAccessError(
                f"this key is version {self._key_version} of {model_id!r}, "
                f"but the file needs version {key_version}"
            )
        return self._key

    def __repr__(self) -> str:
        return f"StaticKey({self._key!r}, model_id={self._model_id!r})"


class KeyFile:
    """A key provider backed by a key file written by ``sealtorch keygen``.

    The file is read when a key is first needed. A file readable by group or others triggers a
    warning (keys should be mode 0600).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._key: DataKey | None = None

    def data_key(self, model_id: str, key_version: int) -> DataKey:
        del model_id, key_version  # a key file holds one key; a mismatch fails authentication
        if self._key is None:
            self._key = read_key_file(self.path)
        return self._key

    def __repr__(self) -> str:
        return f"KeyFile({str(self.path)!r})"


def as_key_provider(key: KeyProvider | DataKey | bytes | str | os.PathLike[str]) -> KeyProvider:
    """Accept what users naturally pass as ``key=`` and return a :class:`KeyProvider`.

    ``bytes``/``bytearray`` and :class:`DataKey` become a :class:`StaticKey`; a ``str`` or path
    is a key file; anything with a ``data_key`` method is used as is.
    """
    if isinstance(key, DataKey | bytes | bytearray):
        return StaticKey(key if isinstance(key, DataKey) else DataKey(bytes(key)))
    if isinstance(key, str | os.PathLike):
        return KeyFile(key)
    if isinstance(key, KeyProvider):
        return key
    raise TypeError(
        "key must be raw key bytes, a DataKey, a key file path, or a key provider "
        f"(an object with a data_key(model_id, key_version) method), not {type(key).__name__}"
    )


def encode_key(key: DataKey) -> str:
    """The text form of a key file: prefix plus URL-safe base64, one line."""
    return KEY_FILE_PREFIX + base64.urlsafe_b64encode(key.material).decode("ascii").rstrip("=")


def decode_key(text: str, *, source: str = "key") -> DataKey:
    """Parse the text form of a key file."""
    text = text.strip(" \t\r\n")
    if not text.startswith(KEY_FILE_PREFIX):
        raise KeyAccessError(
            f"{source} is not a sealtorch key file (it must start with {KEY_FILE_PREFIX!r}); "
            "create one with `sealtorch keygen -o FILE`"
        )
    body = text[len(KEY_FILE_PREFIX) :]
    # urlsafe_b64decode silently drops characters outside the alphabet: check them first.
    if not re.fullmatch(r"[A-Za-z0-9_-]+", body):
        raise KeyAccessError(f"{source} is damaged: its key is not valid base64url")
    try:
        material = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError) as exc:
        raise KeyAccessError(f"{source} is damaged: its key is not valid base64") from exc
    if len(material) != KEY_SIZE:
        raise KeyAccessError(f"{source} is damaged: it does not hold a 256-bit key")
    key = DataKey(material)
    if encode_key(key) != text:  # the last character's 2 unused bits must be zero
        raise KeyAccessError(f"{source} is damaged: its key is not valid base64url")
    return key


def write_key_file(path: str | os.PathLike[str], key: DataKey | None = None) -> DataKey:
    """Write ``key`` (a new random key by default) to a new file with mode 0600.

    Refuses to overwrite an existing file. Returns the key written.
    """
    key = key if key is not None else generate_key()
    target = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(target, flags, 0o600)
    except FileExistsError as exc:
        raise ConfigError(
            f"{target} already exists; sealtorch never overwrites a key file "
            "(choose another name, or delete the old key only if nothing still needs it)"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"cannot create key file {target}: {exc.strerror}") from exc
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(encode_key(key) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return key


def read_key_file(path: str | os.PathLike[str]) -> DataKey:
    """Read a key file, warning when its permissions are wider than 0600."""
    source = Path(path)
    try:
        with open(source, encoding="ascii") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            text = handle.read(_MAX_KEY_FILE + 1)
    except FileNotFoundError as exc:
        raise KeyAccessError(
            f"key file {source} does not exist; create one with `sealtorch keygen -o {source}`"
        ) from exc
    except UnicodeDecodeError as exc:
        raise KeyAccessError(f"{source} is not a sealtorch key file") from exc
    except OSError as exc:
        raise KeyAccessError(f"cannot read key file {source}: {exc.strerror}") from exc
    if stat.S_IMODE(mode) & 0o077:
        _log.warning(
            "key file %s is readable by other users (mode %o); run `chmod 600 %s`",
            source,
            stat.S_IMODE(mode),
            source,
        )
    if len(text) > _MAX_KEY_FILE:
        raise KeyAccessError(f"{source} is not a sealtorch key file (it is too large)")
    return decode_key(text, source=f"key file {source}")
