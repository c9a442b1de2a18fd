"""The key server's release-signing key: it signs a statement for every key it grants.

Enclaves and key caches pin its public key in their measured configuration
(``--keyserver-pubkey``) and refuse any key without a statement it signed
(:mod:`sealtorch.protocol.statement`, ``docs/protocol.md``). It is kept like the master key:

* :class:`FileReleaseSigningKey` — an Ed25519 private key (the 32-byte seed) in a mode-0600
  file (development and single-machine setups; ``release-signing.key`` in the data directory).
  A file that other users can read is refused: it lets anyone vouch for keys.
* :class:`Pkcs11ReleaseSigningKey` — an Ed25519 key pair inside a PKCS#11 token
  (``CKK_EC_EDWARDS``, signing with ``CKM_EDDSA``; SoftHSM2 in tests), found by label, the
  private key created ``CKA_SENSITIVE=TRUE, CKA_EXTRACTABLE=FALSE``; it may share the token
  (and the process's login) with the master key.

The public key's one text form is ``sealtorch-release-key-v1:<base64url>``
(:class:`~sealtorch.protocol.statement.ReleasePublicKey`); ``sealtorch keyserver init`` writes
it next to a file key (``release-signing.pub``) and prints it, ``sealtorch keyserver
signing-key show DATA_DIR`` prints it again.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn, Protocol, runtime_checkable

from sealtorch._crypto.sign import ED25519_SEED_SIZE, ED25519_SIGNATURE_SIZE, Ed25519Signer
from sealtorch.errors import ConfigError, StorageError
from sealtorch.keyserver._keyfile import SecretFileKind, create_secret_file, read_secret_file
from sealtorch.keyserver._pkcs11 import TokenKey, TokenKeyConfig, pkcs11_library
from sealtorch.protocol.statement import ReleasePublicKey

__all__ = [
    "DEFAULT_KEY_LABEL",
    "SIGNING_KEY_FILE",
    "SIGNING_KEY_FILE_PREFIX",
    "FileReleaseSigningKey",
    "FileSigningKeyConfig",
    "Pkcs11ReleaseSigningKey",
    "Pkcs11SigningKeyConfig",
    "ReleaseSigningKey",
    "SigningKeyConfig",
    "open_signing_key",
    "public_key_path",
    "write_public_key",
]

SIGNING_KEY_FILE_PREFIX: Final = "sealtorch-release-signing-key-v1:"
#: The file key's name in a data directory.
SIGNING_KEY_FILE: Final = "release-signing.key"
#: The label of the key pair in a PKCS#11 token.
DEFAULT_KEY_LABEL: Final = "sealtorch-release-signing-key"
#: ``CKA_EC_PARAMS`` of an Ed25519 key: the DER of the curve OID 1.3.101.112, or of the
#: PrintableString "edwards25519" (PKCS#11 3.0 allows both; SoftHSM2 gives private keys the
#: name).
_ED25519_PARAMS: Final = frozenset({bytes.fromhex("06032b6570"), b"\x13\x0cedwards25519"})

_SIGNING_KEY_FILE = SecretFileKind(
    prefix=SIGNING_KEY_FILE_PREFIX,
    what="release-signing key",
    size=ED25519_SEED_SIZE,
    never_overwritten="enclaves pin its public key",
    protects="whoever reads it can vouch for keys of their own",
    missing_hint="create it with `sealtorch keyserver signing-key create DATA_DIR` (docs/"
    "keyserver.md, the release-signing key)",
)


@runtime_checkable
class ReleaseSigningKey(Protocol):
    """Signs release statements. Implementations are thread-safe."""

    @property
    def key_id(self) -> str:
        """The public key's id (:func:`~sealtorch.protocol.statement.release_key_id`)."""
        ...

    @property
    def public_key(self) -> ReleasePublicKey: ...

    @property
    def in_process(self) -> bool:
        """True when signing costs microseconds in this process (may run on the event loop);
        False for a token (a worker thread signs)."""
        ...

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``message``."""
        ...

    def close(self) -> None: ...


# --- file key -------------------------------------------------------------------------------------


class FileReleaseSigningKey:
    """An Ed25519 release-signing key read from a mode-0600 file (development)."""

    __slots__ = ("_key_id", "_public", "_signer", "path")

    def __init__(self, seed: bytes, *, path: Path | None = None) -> None:
        if len(seed) != ED25519_SEED_SIZE:
            raise ConfigError(f"a release-signing key is exactly {ED25519_SEED_SIZE} bytes")
        self._signer = Ed25519Signer(seed)
        self._public = ReleasePublicKey(self._signer.public_key)
        self._key_id = self._public.key_id
        self.path = path

    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> FileReleaseSigningKey:
        """Write a new random key to ``path`` (mode 0600) and its public key next to it
        (:func:`public_key_path`). Never overwrites."""
        _, seed = Ed25519Signer.generate()
        key = cls(seed, path=create_secret_file(path, seed, _SIGNING_KEY_FILE))
        write_public_key(public_key_path(Path(path)), key.public_key)
        return key

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FileReleaseSigningKey:
        """Read a key file; refuses one that other users can read."""
        return cls(read_secret_file(path, _SIGNING_KEY_FILE), path=Path(path))

    @property
    def key_id(self) -> str:
        return self._key_id

    @property
    def public_key(self) -> ReleasePublicKey:
        return self._public

    @property
    def in_process(self) -> bool:
        return True

    def sign(self, message: bytes) -> bytes:
        return self._signer.sign(message)

    def close(self) -> None:
        """Nothing to release (the key lives in this object)."""

    def __repr__(self) -> str:
        return f"FileReleaseSigningKey(<redacted>, key_id={self.key_id!r})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("release-signing keys cannot be pickled")


def public_key_path(key_path: Path) -> Path:
    """Where a file key's public key is written: ``release-signing.key`` → ``.pub``."""
    return key_path.with_suffix(".pub")


def write_public_key(path: Path, key: ReleasePublicKey) -> None:
    """Write the public key's text form to the new file ``path`` (0644: it is public)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot create {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(key.text + "\n")


# --- PKCS#11 key ----------------------------------------------------------------------------------


class Pkcs11ReleaseSigningKey(TokenKey):
    """An Ed25519 release-signing key that never leaves a PKCS#11 token (HSM).

    Opening finds the private key (``CKO_PRIVATE_KEY``, ``CKK_EC_EDWARDS``) and its public key
    by label, checks that the private key is an Ed25519 key, sensitive and non-extractable, and
    reads the public key once. :meth:`sign` runs ``CKM_EDDSA`` inside the token (about a
    millisecond with SoftHSM2, so the key server signs in a worker thread). Create it once with
    :meth:`create_key` (``sealtorch keyserver init --pkcs11-module ...`` does).
    """

    what = "release-signing key"
    create_hint = "; does it support CKM_EC_EDWARDS_KEY_PAIR_GEN (Ed25519)?"

    def __init__(
        self,
        *,
        module: str | os.PathLike[str],
        token_label: str,
        key_label: str,
        pin: str,
    ) -> None:
        self._public: ReleasePublicKey | None = None
        super().__init__(module=module, token_label=token_label, key_label=key_label, pin=pin)

    @classmethod
    def _generate(cls, lib: Any, session: Any, key_label: str) -> None:
        _generate_keypair(lib, session, key_label)

    def _missing(self) -> str:
        return (
            f"Ed25519 key pair labelled {self._key_label!r}; create it with "
            "`sealtorch keyserver signing-key create DATA_DIR` (or "
            "Pkcs11ReleaseSigningKey.create_key)"
        )

    def _locate(self, lib: Any, session: Any) -> Any:
        private, public = (
            self._get_unique(lib, session, key_type=lib.KeyType.EC_EDWARDS, object_class=kind)
            for kind in (lib.ObjectClass.PRIVATE_KEY, lib.ObjectClass.PUBLIC_KEY)
        )
        attribute = lib.Attribute
        try:
            params = {bytes(private[attribute.EC_PARAMS]), bytes(public[attribute.EC_PARAMS])}
            sensitive = private[attribute.SENSITIVE]
            extractable = private[attribute.EXTRACTABLE]
            point = bytes(public[attribute.EC_POINT])
        except lib.exceptions.PKCS11Error as exc:
            raise StorageError(
                f"cannot read the attributes of PKCS#11 key {self._key_label!r} "
                f"({type(exc).__name__})"
            ) from exc
        name = f"PKCS#11 key {self._key_label!r} in token {self._token_label!r}"
        if not params <= _ED25519_PARAMS:
            raise ConfigError(f"{name} is not an Ed25519 key (it is another Edwards curve)")
        if not sensitive or extractable:
            raise ConfigError(
                f"{name} can be read out of the token (CKA_SENSITIVE={sensitive}, "
                f"CKA_EXTRACTABLE={extractable}); sealtorch only signs with a key that is "
                "sensitive and non-extractable. Create a new one with a new label"
            )
        public_key = ReleasePublicKey(_raw_point(point, name))
        if self._public is not None and public_key != self._public:
            raise ConfigError(f"{name} changed while the key server ran; restart it")
        self._public = public_key
        return private

    @property
    def key_id(self) -> str:
        return self.public_key.key_id

    @property
    def public_key(self) -> ReleasePublicKey:
        if self._public is None:  # pragma: no cover - set when the key is found
            raise StorageError("the PKCS#11 release-signing key is not open")
        return self._public

    @property
    def in_process(self) -> bool:
        return False

    def sign(self, message: bytes) -> bytes:
        def operation(lib: Any, key: Any) -> bytes:
            result: bytes = key.sign(message, mechanism=lib.Mechanism.EDDSA)
            return result

        try:
            signature = self._run(operation)
        except pkcs11_library().exceptions.PKCS11Error as exc:
            raise StorageError(
                f"the PKCS#11 token could not sign a release statement ({type(exc).__name__})"
            ) from exc
        if len(signature) != ED25519_SIGNATURE_SIZE:
            raise StorageError("the PKCS#11 token returned a malformed Ed25519 signature")
        return bytes(signature)

    def __repr__(self) -> str:
        return (
            f"Pkcs11ReleaseSigningKey(module={self._module!r}, token={self._token_label!r}, "
            f"key={self._key_label!r})"
        )


def _generate_keypair(lib: Any, session: Any, key_label: str) -> None:
    from pkcs11.util.ec import encode_named_curve_parameters

    attribute = lib.Attribute
    parameters = session.create_domain_parameters(
        lib.KeyType.EC_EDWARDS,
        {attribute.EC_PARAMS: encode_named_curve_parameters("1.3.101.112")},
        local=True,
    )
    parameters.generate_keypair(
        store=True,
        label=key_label,
        mechanism=lib.Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
        public_template={
            attribute.TOKEN: True,
            attribute.VERIFY: True,
            attribute.MODIFIABLE: False,
        },
        private_template={
            attribute.TOKEN: True,
            attribute.PRIVATE: True,
            attribute.SENSITIVE: True,
            attribute.EXTRACTABLE: False,
            attribute.MODIFIABLE: False,
            attribute.SIGN: True,
            attribute.DECRYPT: False,
            attribute.UNWRAP: False,
            attribute.DERIVE: False,
        },
    )


def _raw_point(point: bytes, name: str) -> bytes:
    """The 32 raw bytes of an Ed25519 ``CKA_EC_POINT`` (a DER OCTET STRING, or raw)."""
    if len(point) == 34 and point[:2] == b"\x04\x20":
        return point[2:]
    if len(point) == 32:
        return point
    raise ConfigError(f"{name} has a public key that is not an Ed25519 point")


# --- configuration --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileSigningKeyConfig:
    """Use the release-signing key in a 0600 file."""

    path: Path


@dataclass(frozen=True)
class Pkcs11SigningKeyConfig(TokenKeyConfig):
    """Use a release-signing key pair inside a PKCS#11 token; the PIN comes from ``pin_env``."""

    key_label: str = DEFAULT_KEY_LABEL


SigningKeyConfig = FileSigningKeyConfig | Pkcs11SigningKeyConfig


def open_signing_key(
    config: SigningKeyConfig,
    *,
    environ: Mapping[str, str] | None = None,
    create: bool = False,
) -> ReleaseSigningKey:
    """Open (or with ``create=True``, first create) the release-signing key of ``config``."""
    if isinstance(config, FileSigningKeyConfig):
        if create:
            return FileReleaseSigningKey.create(config.path)
        return FileReleaseSigningKey.load(config.path)
    return config.open(Pkcs11ReleaseSigningKey, environ=environ, create=create)
