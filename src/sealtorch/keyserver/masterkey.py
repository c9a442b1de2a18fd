"""Master key providers: the root of the key hierarchy.

Every model data key (DEK) version is stored in the database only *wrapped* by the master key:
``blob = master.wrap(dek, aad=wrap_aad(model_id, version))``. The AAD binds the wrapped key to
its model and version, so a blob copied into another row (another model, another version) fails
to unwrap with :class:`~sealtorch.errors.IntegrityError` instead of releasing the wrong key.

Two providers implement :class:`MasterKey`:

* :class:`FileMasterKey` — a 256-bit secret in a mode-0600 file (development and single-machine
  setups). The wrapping key is HKDF-SHA256 of the secret; wrapping is AES-256-GCM with a random
  nonce. A file that other users can read is *refused*: it is the key to every model.
* :class:`Pkcs11MasterKey` — an AES-256 key inside a PKCS#11 token (an HSM; SoftHSM2 in tests),
  found by label, created ``CKA_SENSITIVE=TRUE, CKA_EXTRACTABLE=FALSE``; wrapping is
  ``CKM_AES_GCM`` *inside the token* with the AAD, so the master key never exists in this
  process. The user PIN comes from the configuration or the ``SEALTORCH_PKCS11_PIN`` environment
  variable and is never logged or shown.

Blob format (both providers): one format byte (``0x01`` file, ``0x02`` PKCS#11), the 12-byte
GCM nonce, the 32-byte wrapped key and the 16-byte tag (61 bytes). The format byte is part of
the authenticated data.
"""

from __future__ import annotations

import logging
import os
import secrets
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol, runtime_checkable

from sealtorch._crypto.dekwrap import NONCE_SIZE, TAG_SIZE, GcmKey, hkdf_sha256
from sealtorch.errors import ConfigError, IntegrityError, StorageError
from sealtorch.keys import KEY_SIZE, DataKey
from sealtorch.keyserver._keyfile import SecretFileKind, create_secret_file, read_secret_file
from sealtorch.keyserver._pkcs11 import (
    PIN_ENV,
    SOFTHSM2_MODULE,
    TokenKey,
    TokenKeyConfig,
    pkcs11_library,
)

__all__ = [
    "MASTER_KEY_FILE_PREFIX",
    "PIN_ENV",
    "SOFTHSM2_MODULE",
    "UNWRAP_FAILED_MESSAGE",
    "FileMasterKey",
    "FileMasterKeyConfig",
    "MasterKey",
    "MasterKeyConfig",
    "Pkcs11MasterKey",
    "Pkcs11MasterKeyConfig",
    "open_master_key",
    "wrap_aad",
]

_log = logging.getLogger(__name__)

MASTER_KEY_FILE_PREFIX = "sealtorch-master-key-v1:"
_MASTER_KEY_FILE = SecretFileKind(
    prefix=MASTER_KEY_FILE_PREFIX,
    what="master key",
    size=KEY_SIZE,
    never_overwritten="every wrapped data key depends on it",
    protects="it protects every model key",
    missing_hint="create a key server data directory with `sealtorch keyserver init DIR`",
)

UNWRAP_FAILED_MESSAGE = (
    "a wrapped data key failed authentication: it was modified, belongs to another model or key "
    "version, or was wrapped by another master key"
)

_FORMAT_FILE = 0x01
_FORMAT_PKCS11 = 0x02
_BLOB_SIZE = 1 + NONCE_SIZE + KEY_SIZE + TAG_SIZE
_AAD_TAG = b"sealtorch/v1/dek-wrap\x00"


def wrap_aad(model_id: str, key_version: int) -> bytes:
    """The associated data that binds a wrapped data key to its model and key version."""
    if not model_id or not isinstance(model_id, str):
        raise ValueError("model_id must be a non-empty string")
    if isinstance(key_version, bool) or not 1 <= key_version < 1 << 32:
        raise ValueError("key versions are integers from 1 to 2**32-1")
    raw = model_id.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise ValueError("model_id is too long")
    return _AAD_TAG + struct.pack(">H", len(raw)) + raw + struct.pack(">I", key_version)


@runtime_checkable
class MasterKey(Protocol):
    """Wraps and unwraps data keys. Implementations are thread-safe."""

    @property
    def key_id(self) -> str:
        """A stable, non-secret identifier of this master key (stored next to each blob)."""
        ...

    @property
    def in_process(self) -> bool:
        """True when wrapping costs microseconds in this process (may run on the event loop);
        False for a token (a worker thread unwraps)."""
        ...

    def wrap(self, dek: DataKey | bytes, aad: bytes) -> bytes:
        """Encrypt a 32-byte data key, binding ``aad`` (use :func:`wrap_aad`)."""
        ...

    def unwrap(self, blob: bytes, aad: bytes) -> DataKey:
        """Decrypt a blob from :meth:`wrap`; :class:`~sealtorch.errors.IntegrityError` if it
        was modified, the AAD differs, or another master key wrapped it."""
        ...

    def close(self) -> None:
        """Release resources (PKCS#11 session). The object is unusable afterwards."""
        ...


def _dek_bytes(dek: DataKey | bytes) -> bytes:
    material = dek.material if isinstance(dek, DataKey) else bytes(dek)
    if len(material) != KEY_SIZE:
        raise ValueError(f"a data key is {KEY_SIZE} bytes")
    return material


def _split_blob(blob: bytes, expected_format: int) -> tuple[bytes, bytes]:
    """(nonce, ciphertext||tag) of a well-formed blob, else the uninformative IntegrityError."""
    blob = bytes(blob)
    if len(blob) != _BLOB_SIZE or blob[0] != expected_format:
        raise IntegrityError(UNWRAP_FAILED_MESSAGE)
    return blob[1 : 1 + NONCE_SIZE], blob[1 + NONCE_SIZE :]


def _full_aad(format_byte: int, aad: bytes) -> bytes:
    return bytes([format_byte]) + bytes(aad)


# --- file master key ------------------------------------------------------------------------------


class FileMasterKey:
    """A master key read from a mode-0600 file (development / single machine).

    Create one with :meth:`create` (``sealtorch keyserver init`` does); load it with
    :meth:`load`, which refuses a file that group or others can read.
    """

    __slots__ = ("_gcm", "_key_id", "path")

    def __init__(self, secret: bytes, *, path: Path | None = None) -> None:
        if len(secret) != KEY_SIZE:
            raise ConfigError(f"a master key is exactly {KEY_SIZE} bytes")
        self._gcm = GcmKey.derive(secret, info=b"sealtorch/v1/master-key/dek-wrap")
        key_id = hkdf_sha256(secret, info=b"sealtorch/v1/master-key/id", length=8).hex()
        self._key_id = f"file:{key_id}"
        self.path = path

    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> FileMasterKey:
        """Write a new random master key to ``path`` (mode 0600). Never overwrites."""
        secret = secrets.token_bytes(KEY_SIZE)
        return cls(secret, path=create_secret_file(path, secret, _MASTER_KEY_FILE))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FileMasterKey:
        """Read a master key file; refuses one that other users can read."""
        return cls(read_secret_file(path, _MASTER_KEY_FILE), path=Path(path))

    @property
    def key_id(self) -> str:
        return self._key_id

    @property
    def in_process(self) -> bool:
        return True

    def wrap(self, dek: DataKey | bytes, aad: bytes) -> bytes:
        return bytes([_FORMAT_FILE]) + self._gcm.seal(
            _dek_bytes(dek), aad=_full_aad(_FORMAT_FILE, aad)
        )

    def unwrap(self, blob: bytes, aad: bytes) -> DataKey:
        _split_blob(blob, _FORMAT_FILE)
        material = self._gcm.open(
            bytes(blob)[1:], aad=_full_aad(_FORMAT_FILE, aad), message=UNWRAP_FAILED_MESSAGE
        )
        return DataKey(material)

    def close(self) -> None:
        """Nothing to release (the key lives in this object)."""

    def __repr__(self) -> str:
        return f"FileMasterKey(<redacted>, key_id={self._key_id!r})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("master keys cannot be pickled")


# --- PKCS#11 master key ---------------------------------------------------------------------------


class Pkcs11MasterKey(TokenKey):
    """A master key that never leaves a PKCS#11 token (HSM).

    Opening logs into the token with the user PIN (once per process and token, shared with
    every key in it, see :class:`~sealtorch.keyserver._pkcs11.TokenLogin`), finds the AES-256
    secret key by label and checks that it is sensitive and non-extractable, refusing it
    otherwise. :meth:`wrap` and :meth:`unwrap` run ``CKM_AES_GCM`` inside the token. Calls are
    serialised per token; when the token drops the session (HSM restart), the provider logs in
    again once. Open it in each process (after any ``fork``): PKCS#11 sessions do not survive a
    fork.

    Create the key once with :meth:`create_key` (``sealtorch keyserver init`` does).
    """

    what = "master key"

    @classmethod
    def _existing_query(cls, lib: Any) -> dict[Any, Any]:
        return {lib.Attribute.CLASS: lib.ObjectClass.SECRET_KEY}

    @classmethod
    def _generate(cls, lib: Any, session: Any, key_label: str) -> None:
        session.generate_key(
            lib.KeyType.AES,
            256,
            label=key_label,
            store=True,
            capabilities=lib.MechanismFlag.ENCRYPT | lib.MechanismFlag.DECRYPT,
            template=_master_key_template(lib),
        )

    def _missing(self) -> str:
        return (
            f"AES key labelled {self._key_label!r}; create it with `sealtorch keyserver init` "
            "(or Pkcs11MasterKey.create_key)"
        )

    def _locate(self, lib: Any, session: Any) -> Any:
        """Look the key up by label in ``session`` and check its attributes."""
        key = self._get_unique(
            lib, session, key_type=lib.KeyType.AES, object_class=lib.ObjectClass.SECRET_KEY
        )
        self._check_key(lib, key)
        return key

    def _check_key(self, lib: Any, key: Any) -> None:
        attribute = lib.Attribute
        try:
            length = key[attribute.VALUE_LEN]
            sensitive = key[attribute.SENSITIVE]
            extractable = key[attribute.EXTRACTABLE]
            always_sensitive = key[attribute.ALWAYS_SENSITIVE]
            never_extractable = key[attribute.NEVER_EXTRACTABLE]
        except lib.exceptions.PKCS11Error as exc:
            raise StorageError(
                f"cannot read the attributes of PKCS#11 key {self._key_label!r} "
                f"({type(exc).__name__})"
            ) from exc
        where = f"PKCS#11 key {self._key_label!r} in token {self._token_label!r}"
        if length != KEY_SIZE:
            raise ConfigError(f"{where} is not an AES-256 key ({length * 8} bits)")
        if not sensitive or extractable:
            raise ConfigError(
                f"{where} can be read out of the token (CKA_SENSITIVE={sensitive}, "
                f"CKA_EXTRACTABLE={extractable}); sealtorch only uses a master key that is "
                "sensitive and non-extractable. Create a new one with a new label"
            )
        if not always_sensitive or not never_extractable:
            _log.warning(
                "%s was once readable outside the token (imported or relaxed attributes); "
                "prefer a key generated inside the token",
                where,
            )

    # -- operations --

    @property
    def key_id(self) -> str:
        return f"pkcs11:{self._token_label}/{self._key_label}"

    @property
    def in_process(self) -> bool:
        return False

    def wrap(self, dek: DataKey | bytes, aad: bytes) -> bytes:
        material = _dek_bytes(dek)
        nonce = secrets.token_bytes(NONCE_SIZE)
        full_aad = _full_aad(_FORMAT_PKCS11, aad)

        def operation(lib: Any, key: Any) -> bytes:
            params = lib.mechanisms.GCMParams(nonce, full_aad, TAG_SIZE * 8)
            result: bytes = key.encrypt(
                material, mechanism=lib.Mechanism.AES_GCM, mechanism_param=params
            )
            return result

        try:
            ciphertext = self._run(operation)
        except pkcs11_library().exceptions.PKCS11Error as exc:
            raise StorageError(
                f"the PKCS#11 token could not wrap a data key ({type(exc).__name__})"
            ) from exc
        if len(ciphertext) != KEY_SIZE + TAG_SIZE:
            raise StorageError("the PKCS#11 token returned a malformed AES-GCM result")
        return bytes([_FORMAT_PKCS11]) + nonce + ciphertext

    def unwrap(self, blob: bytes, aad: bytes) -> DataKey:
        nonce, ciphertext = _split_blob(blob, _FORMAT_PKCS11)
        full_aad = _full_aad(_FORMAT_PKCS11, aad)

        def operation(lib: Any, key: Any) -> bytes:
            params = lib.mechanisms.GCMParams(nonce, full_aad, TAG_SIZE * 8)
            result: bytes = key.decrypt(
                ciphertext, mechanism=lib.Mechanism.AES_GCM, mechanism_param=params
            )
            return result

        errors = pkcs11_library().exceptions
        try:
            material = self._run(operation)
        except (
            # SoftHSM2 reports a failed GCM tag check as CKR_GENERAL_ERROR; the standard codes
            # are CKR_ENCRYPTED_DATA_INVALID / CKR_ENCRYPTED_DATA_LEN_RANGE.
            errors.GeneralError,
            errors.EncryptedDataInvalid,
            errors.EncryptedDataLenRange,
            errors.FunctionFailed,
        ) as exc:
            raise IntegrityError(UNWRAP_FAILED_MESSAGE) from exc
        except errors.PKCS11Error as exc:
            raise StorageError(
                f"the PKCS#11 token could not unwrap a data key ({type(exc).__name__})"
            ) from exc
        if len(material) != KEY_SIZE:
            raise IntegrityError(UNWRAP_FAILED_MESSAGE)
        return DataKey(material)

    def __repr__(self) -> str:
        return (
            f"Pkcs11MasterKey(module={self._module!r}, token={self._token_label!r}, "
            f"key={self._key_label!r})"
        )

    def __reduce__(self) -> NoReturn:
        raise TypeError("master keys cannot be pickled")


def _master_key_template(lib: Any) -> dict[Any, bool]:
    attribute = lib.Attribute
    return {
        attribute.TOKEN: True,
        attribute.PRIVATE: True,
        attribute.SENSITIVE: True,
        attribute.EXTRACTABLE: False,
        attribute.MODIFIABLE: False,
        attribute.WRAP: False,
        attribute.UNWRAP: False,
        attribute.SIGN: False,
        attribute.VERIFY: False,
        attribute.DERIVE: False,
    }


# --- configuration --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileMasterKeyConfig:
    """Use the master key in a 0600 file."""

    path: Path


@dataclass(frozen=True)
class Pkcs11MasterKeyConfig(TokenKeyConfig):
    """Use a master key inside a PKCS#11 token; the PIN comes from ``pin_env``."""

    key_label: str = "sealtorch-master-key"


MasterKeyConfig = FileMasterKeyConfig | Pkcs11MasterKeyConfig


def open_master_key(
    config: MasterKeyConfig,
    *,
    environ: Mapping[str, str] | None = None,
    create: bool = False,
) -> MasterKey:
    """Open (or with ``create=True``, first create) the master key described by ``config``."""
    if isinstance(config, FileMasterKeyConfig):
        return FileMasterKey.create(config.path) if create else FileMasterKey.load(config.path)
    return config.open(Pkcs11MasterKey, environ=environ, create=create)
