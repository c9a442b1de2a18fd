"""Optional restart persistence: the cache's keys sealed with the platform's sealing key.

Keys never touch disk in plaintext. With ``--persist PATH`` the cache writes, after every
successful refresh, one file sealed with a key only *this enclave measurement on this platform*
can derive:

* ``gramine``: Gramine's ``/dev/attestation/keys/_sgx_mrenclave`` — the SGX sealing key bound
  to MRENCLAVE by the CPU — read from a configurable root (tests use a fake directory); the
  measurement itself is read from ``my_target_info``;
* ``sim``: a 0600 host key file (development only: anyone who can read it can open the state).

The AES-256-GCM key is ``HKDF-SHA256(platform key, info = "sealtorch/v1/keycache-state" ‖ TEE ‖
measurement)`` and the whole header (format, TEE, measurement, time) is the associated data, so
a blob edited in any byte, or written under another measurement, is refused. Layout::

    b"STKC" ‖ version (1 byte) ‖ header length (2 bytes, big endian) ‖ header (canonical JSON)
    ‖ nonce (12) ‖ AES-256-GCM(payload JSON) ‖ tag (16)

Each key is stored with the key server's signed release statement about it; on restart every
statement is verified again under the pinned key server keys and against its key (a key whose
statement no longer verifies — the pins changed — is dropped). Keys whose leases are still
running are served until the first refresh replaces them (or their leases end). A host that
rolls the wall clock back can make an old lease look valid for longer; that is bounded by the
lease the key server granted and ends at the first refresh that reaches the key server (see
``docs/keycache.md``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import secrets
import stat
import struct
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from sealtorch._crypto.dekwrap import GcmKey
from sealtorch.attestation import Policy
from sealtorch.errors import (
    ConfigError,
    FormatError,
    IntegrityError,
    PolicyError,
    ReleaseStatementError,
)
from sealtorch.keycache.holdings import HeldKey, Holdings
from sealtorch.keys import DataKey
from sealtorch.protocol import SignedStatement, TrustedReleaseKeys

__all__ = [
    "GRAMINE_SEALING_KEY",
    "PlatformSealer",
    "SealedState",
    "StateRefused",
]

_log = logging.getLogger("sealtorch.keycache")

MAGIC: Final = b"STKC"
VERSION: Final = 1
GRAMINE_SEALING_KEY: Final = "keys/_sgx_mrenclave"
_GRAMINE_TARGET_INFO: Final = "my_target_info"
_KDF_INFO: Final = b"sealtorch/v1/keycache-state\x00"
_SIM_KEY_PREFIX: Final = "sealtorch-sim-sealing-key-v1:"
_MAX_STATE: Final = 16 * 1024 * 1024
_OPEN_FAILED: Final = (
    "the sealed key cache state failed authentication: it was modified, or sealed on another "
    "platform or with another sealing key; it is ignored (keys are fetched from the key server)"
)


class StateRefused(IntegrityError):  # noqa: N818 - what happened to the file
    """A sealed state file that this enclave will not use (edited, foreign, other code)."""


def _time(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _canonical(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


class PlatformSealer:
    """Seals bytes to this enclave measurement on this platform (see module docstring)."""

    __slots__ = ("_key", "measurement", "tee")

    def __init__(self, *, tee: str, measurement: str, platform_key: bytes) -> None:
        if len(platform_key) < 16:
            raise ConfigError("a platform sealing key has at least 128 bits")
        self.tee = tee
        self.measurement = measurement.lower()
        context = _KDF_INFO + tee.encode("ascii") + b"\x00" + bytes.fromhex(self.measurement)
        self._key = GcmKey.derive(platform_key, info=context)

    def __repr__(self) -> str:
        return f"PlatformSealer(tee={self.tee!r}, measurement={self.measurement[:16]}...)"

    @classmethod
    def for_sim(cls, *, key_file: str | os.PathLike[str], measurement: str) -> PlatformSealer:
        """The sim sealer: a host key file (created 0600 on first use)."""
        return cls(tee="sim", measurement=measurement, platform_key=_sim_key(Path(key_file)))

    @classmethod
    def for_gramine(cls, root: str | os.PathLike[str] = "/dev/attestation") -> PlatformSealer:
        """The Gramine-SGX sealer: the MRENCLAVE-bound sealing key from ``root``."""
        base = Path(root)
        key = _read_device(base / GRAMINE_SEALING_KEY, 64)
        if len(key) != 16:
            raise ConfigError(
                f"{base / GRAMINE_SEALING_KEY} did not give a 16-byte SGX sealing key; is this "
                "Gramine-SGX with attestation enabled?"
            )
        target_info = _read_device(base / _GRAMINE_TARGET_INFO, 512)
        if len(target_info) < 32:
            raise ConfigError(f"{base / _GRAMINE_TARGET_INFO} is too short for SGX target info")
        return cls(tee="gramine", measurement=target_info[:32].hex(), platform_key=key)

    def seal(self, payload: bytes, *, sealed_at: datetime) -> bytes:
        header = _canonical(
            {
                "format": VERSION,
                "measurement": self.measurement,
                "sealed_at": _time(sealed_at),
                "tee": self.tee,
            }
        )
        prefix = MAGIC + bytes([VERSION]) + struct.pack(">H", len(header)) + header
        return prefix + self._key.seal(payload, aad=prefix)

    def open(self, blob: bytes) -> bytes:
        """The payload, or :class:`StateRefused` (edited, other measurement, other key)."""
        if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 3:
            raise FormatError("not a sealtorch key cache state file (bad magic)")
        if blob[len(MAGIC)] != VERSION:
            raise FormatError(f"key cache state format {blob[len(MAGIC)]} is not supported")
        (length,) = struct.unpack_from(">H", blob, len(MAGIC) + 1)
        start = len(MAGIC) + 3
        prefix = blob[: start + length]
        try:
            header = json.loads(blob[start : start + length])
        except (UnicodeDecodeError, ValueError) as exc:
            raise StateRefused(_OPEN_FAILED) from exc
        if not isinstance(header, dict):
            raise StateRefused(_OPEN_FAILED)
        theirs = (header.get("tee"), header.get("measurement"))
        if theirs != (self.tee, self.measurement):
            raise StateRefused(
                "the sealed key cache state was written by another enclave measurement or TEE "
                f"({theirs[0]}, {str(theirs[1])[:16]}...; this is {self.tee}, "
                f"{self.measurement[:16]}...): the code changed, so it is ignored and keys are "
                "fetched from the key server"
            )
        try:
            return self._key.open(blob[start + length :], aad=prefix, message=_OPEN_FAILED)
        except IntegrityError as exc:
            raise StateRefused(_OPEN_FAILED) from exc


class SealedState:
    """The key cache's sealed state file (``--persist PATH``); ``trusted_release_keys`` are the
    pinned key server keys that every restored key's statement must verify under."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        sealer: PlatformSealer,
        *,
        trusted_release_keys: TrustedReleaseKeys,
    ) -> None:
        self.path = Path(path)
        self.sealer = sealer
        self._trusted = trusted_release_keys

    def __repr__(self) -> str:
        return f"SealedState({str(self.path)!r}, {self.sealer!r})"

    def save(self, holdings: Holdings, *, now: datetime) -> None:
        """Seal and atomically replace the state file (mode 0600)."""
        entries = [
            {
                "model_id": held.model_id,
                "key_version": held.key_version,
                "key": base64.urlsafe_b64encode(held.key.material).decode("ascii"),
                "expires_at": _time(held.expires_at),
                "received_at": _time(held.received_at),
                "policy": dict(held.policy_document),
                "policy_version": held.policy_version,
                "policy_digest": held.policy_digest,
                "statement": held.statement.model_dump(mode="json"),
            }
            for versions in holdings.keys.values()
            for held in versions
            if now < held.expires_at
        ]
        blob = self.sealer.seal(_canonical({"keys": entries}), sealed_at=now)
        del entries
        _atomic_write(self.path, blob)

    def load(self, *, now: datetime) -> list[HeldKey]:
        """The keys in the state file whose leases still run at ``now``; [] if there is no
        file. Raises :class:`StateRefused`/:class:`FormatError` for a file it will not use."""
        try:
            with open(self.path, "rb") as handle:
                blob = handle.read(_MAX_STATE + 1)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ConfigError(f"cannot read key cache state {self.path}: {exc.strerror}") from exc
        if len(blob) > _MAX_STATE:
            raise FormatError(f"{self.path} is larger than a key cache state can be")
        payload = self.sealer.open(blob)
        try:
            entries = json.loads(payload)["keys"]
            held = [_held(entry) for entry in entries]
        except (KeyError, TypeError, ValueError, binascii.Error, PolicyError) as exc:
            # Authenticated but not understood: written by an incompatible build.
            raise StateRefused(
                "the sealed key cache state authenticated but its contents are not understood; "
                "it is ignored"
            ) from exc
        finally:
            del payload
        return [k for k in held if now < k.expires_at and self._verified(k)]

    def _verified(self, held: HeldKey) -> bool:
        """Whether the key server's statement about ``held`` verifies under the pinned keys
        and is about exactly this key (else it is dropped, with a log line)."""
        what = f"the key of {held.model_id!r} v{held.key_version}"
        try:
            statement = self._trusted.verify(held.statement, what=what, source=str(self.path))
            statement.check_key(
                model_id=held.model_id,
                key_version=held.key_version,
                policy_digest=held.policy_digest,
                key=held.key.material,
                source=str(self.path),
            )
        except ReleaseStatementError as exc:
            _log.warning("not restoring %s: %s (%s)", what, exc.reason, exc)
            return False
        return True


def _held(entry: dict[str, Any]) -> HeldKey:
    policy = Policy.from_dict(entry["policy"], source="persisted policy")
    if policy.digest != entry["policy_digest"]:
        raise ValueError("policy digest mismatch")
    return HeldKey(
        model_id=str(entry["model_id"]),
        key_version=int(entry["key_version"]),
        key=DataKey(base64.urlsafe_b64decode(entry["key"])),
        expires_at=datetime.fromisoformat(entry["expires_at"]),
        received_at=datetime.fromisoformat(entry["received_at"]),
        policy=policy,
        policy_document=entry["policy"],
        policy_version=int(entry["policy_version"]),
        policy_digest=str(entry["policy_digest"]),
        statement=SignedStatement.model_validate(entry["statement"]),
    )


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write key cache state {path}: {exc.strerror}") from exc
    try:
        directory = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - directory fsync is best effort
        return
    try:
        os.fsync(directory)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(directory)


def _read_device(path: Path, limit: int) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(limit)
    except FileNotFoundError as exc:
        raise ConfigError(
            f"{path} does not exist: persistence with --tee gramine needs Gramine-SGX (the "
            "sealing key pseudo-files); run without --persist outside an enclave"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc


def _sim_key(path: Path) -> bytes:
    """The host's sim sealing key, created (mode 0600) on first use."""
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        material = secrets.token_bytes(32)
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600
            )
            with os.fdopen(fd, "w", encoding="ascii") as handle:
                handle.write(
                    _SIM_KEY_PREFIX
                    + base64.urlsafe_b64encode(material).decode("ascii").rstrip("=")
                    + "\n"
                )
                handle.flush()
                os.fsync(handle.fileno())
            with contextlib.suppress(FileExistsError):  # someone else was first: read theirs
                os.link(tmp, path)
        except OSError as exc:
            raise ConfigError(f"cannot create sim sealing key {path}: {exc.strerror}") from exc
        finally:
            tmp.unlink(missing_ok=True)
    try:
        with open(path, encoding="ascii") as handle:
            mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
            text = handle.read(4096).strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read sim sealing key {path}") from exc
    if mode & 0o077:
        raise ConfigError(
            f"sim sealing key {path} is readable by other users (mode {mode:o}); run "
            f"`chmod 600 {path}`"
        )
    if not text.startswith(_SIM_KEY_PREFIX):
        raise ConfigError(f"{path} is not a sealtorch sim sealing key file")
    body = text[len(_SIM_KEY_PREFIX) :]
    try:
        material = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"sim sealing key file {path} is damaged") from exc
    if len(material) != 32:
        raise ConfigError(f"sim sealing key file {path} is damaged")
    return material
