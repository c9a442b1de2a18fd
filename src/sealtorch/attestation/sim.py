"""The simulated TEE (``sim``): a software attester and verifier that exercise the real paths.

Nothing about ``sim`` is hardware-backed: it exists so that the key server, key cache and
inference server can be developed and tested end to end on any machine. It behaves like SGX:

* Its evidence carries SGX-style claims — MRENCLAVE, MRSIGNER, ISVPRODID, ISVSVN, ATTRIBUTES
  (with the DEBUG bit), a TCB status and advisory ids — and the 64-byte report_data.
* MRENCLAVE is :func:`measure`: SHA-256 over the sealtorch package's files (sorted relative
  paths and contents) and the *role* (``keycache``, ``serve``, ``app``), so changing one byte of
  the code, or running another role, changes the measurement — as on real hardware.
* Evidence is signed with Ed25519 by a per-host *simulated attestation key*, kept in a 0600 file
  (created on first use; default ``$SEALTORCH_SIM_KEY`` or
  ``$XDG_DATA_HOME/sealtorch/sim-attestation.key``). A verifier accepts only keys it was
  explicitly configured to trust (``sealtorch attest sim-key --show-public`` prints one), and a
  release policy accepts sim claims only if it lists ``sim`` in ``allowed_tees``.

The evidence layout is specified in ``docs/attestation.md``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import secrets
import stat
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

from sealtorch._crypto.sign import (
    ED25519_PUBLIC_KEY_SIZE,
    ED25519_SEED_SIZE,
    ED25519_SIGNATURE_SIZE,
    BadSignature,
    Ed25519Signer,
    ed25519_verify,
)
from sealtorch.attestation.claims import TCB_STATUSES, Claims
from sealtorch.attestation.collateral import _aware
from sealtorch.attestation.evidence import (
    REPORT_DATA_SIZE,
    SIM_EVIDENCE_MAGIC,
    Evidence,
    EvidenceType,
    require_report_data,
)
from sealtorch.attestation.verifier import UnsupportedEvidenceError, UntrustedAttestationKeyError
from sealtorch.errors import ConfigError, EvidenceError

__all__ = [
    "KNOWN_ROLES",
    "SIM_KEY_ENV",
    "SIM_MRSIGNER",
    "SimAttester",
    "SimVerifier",
    "default_sim_key_path",
    "format_sim_public_key",
    "load_or_create_sim_key",
    "measure",
    "parse_sim_public_key",
]

#: Roles sealtorch measures: the key cache, the inference server, and a user's own program
#: that calls ``sealtorch.load_model`` inside the TEE.
KNOWN_ROLES: Final = ("keycache", "serve", "app")
_ROLE = re.compile(r"[a-z][a-z0-9-]{0,31}")
_ADVISORY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

SIM_KEY_ENV: Final = "SEALTORCH_SIM_KEY"
_KEY_PREFIX: Final = "sealtorch-sim-attestation-key-v1:"
_PUBLIC_PREFIX: Final = "ed25519:"
_MEASURE_TAG: Final = b"sealtorch/v1/sim-mrenclave"
_SIGN_TAG: Final = b"sealtorch/v1/sim-evidence\x00"
#: MRSIGNER of every sim enclave: "signed by the sealtorch project" (a fixed, documented value).
SIM_MRSIGNER: Final = hashlib.sha256(b"sealtorch/v1/sim-mrsigner").hexdigest()
_ATTR_INIT_MODE64: Final = 0x05
_ATTR_DEBUG: Final = 0x02
_MAX_ADVISORIES: Final = 64

_HEAD = struct.Struct(">16s32s32sHHB64s32s")  # attributes .. public key


def _package_root() -> Path:
    import sealtorch

    return Path(sealtorch.__file__).resolve().parent


def _check_role(role: str) -> str:
    value: object = role
    if not isinstance(value, str) or not _ROLE.fullmatch(role):
        raise ConfigError(
            f"sim role must be a short lowercase name like {', '.join(KNOWN_ROLES)}, not {role!r}"
        )
    return role


def _lp(data: bytes) -> bytes:
    return struct.pack(">Q", len(data)) + data


def measure(role: str, *, package_root: str | os.PathLike[str] | None = None) -> str:
    """The sim MRENCLAVE (hex) of this installation's sealtorch code running as ``role``.

    SHA-256 over ``lp(tag) ‖ lp(role) ‖ for each file (sorted by relative POSIX path):
    lp(path) ‖ lp(contents)`` where ``lp`` prefixes an 8-byte big-endian length. Every regular
    file of the package counts except ``__pycache__`` directories and ``.pyc``/``.pyo`` files.
    """
    _check_role(role)
    root = Path(package_root) if package_root is not None else _package_root()
    if not root.is_dir():
        raise ConfigError(f"cannot measure {root}: not a directory")
    files: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [name for name in dirnames if name != "__pycache__"]
        for name in filenames:
            if name.endswith((".pyc", ".pyo")):
                continue
            path = Path(dirpath) / name
            if path.is_file():
                files.append((path.relative_to(root).as_posix(), path))
    digest = hashlib.sha256(_lp(_MEASURE_TAG) + _lp(role.encode("ascii")))
    for relative, path in sorted(files):
        try:
            contents = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot measure {path}: {exc.strerror}") from exc
        digest.update(_lp(relative.encode("utf-8")) + _lp(contents))
    return digest.hexdigest()


# -- the simulated attestation key ----------------------------------------------------------------


def default_sim_key_path() -> Path:
    """``$SEALTORCH_SIM_KEY``, else ``$XDG_DATA_HOME/sealtorch/sim-attestation.key``
    (``~/.local/share/sealtorch/sim-attestation.key``)."""
    configured = os.environ.get(SIM_KEY_ENV)
    if configured:
        return Path(configured)
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "sealtorch" / "sim-attestation.key"


def format_sim_public_key(public_key: bytes) -> str:
    """The text form of a sim attestation public key: ``ed25519:<64 hex digits>``."""
    return _PUBLIC_PREFIX + public_key.hex()


def parse_sim_public_key(text: str | bytes) -> bytes:
    """Parse ``ed25519:<hex>`` (or accept 32 raw bytes) into a raw public key."""
    if isinstance(text, bytes):
        if len(text) != ED25519_PUBLIC_KEY_SIZE:
            raise ConfigError(f"a sim attestation public key is {ED25519_PUBLIC_KEY_SIZE} bytes")
        return text
    value = text.strip()
    if not value.startswith(_PUBLIC_PREFIX) or not re.fullmatch(
        r"[0-9a-fA-F]{64}", value[len(_PUBLIC_PREFIX) :]
    ):
        raise ConfigError(
            f"{text!r} is not a sim attestation public key: expected 'ed25519:' and 64 hex "
            "digits (see `sealtorch attest sim-key --show-public`)"
        )
    return bytes.fromhex(value[len(_PUBLIC_PREFIX) :])


def _decode_key_file(text: str, path: Path) -> Ed25519Signer:
    text = text.strip()
    if not text.startswith(_KEY_PREFIX):
        raise ConfigError(f"{path} is not a sealtorch sim attestation key file")
    body = text[len(_KEY_PREFIX) :]
    try:
        seed = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"sim attestation key file {path} is damaged") from exc
    if len(seed) != ED25519_SEED_SIZE:
        raise ConfigError(f"sim attestation key file {path} is damaged")
    return Ed25519Signer(seed)


def _read_key(path: Path) -> Ed25519Signer:
    try:
        with open(path, encoding="ascii") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            text = handle.read(4096)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not a sealtorch sim attestation key file") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read sim attestation key {path}: {exc.strerror}") from exc
    if stat.S_IMODE(mode) & 0o077:
        raise ConfigError(
            f"sim attestation key {path} is readable by other users (mode "
            f"{stat.S_IMODE(mode):o}); run `chmod 600 {path}`"
        )
    return _decode_key_file(text, path)


def load_or_create_sim_key(path: str | os.PathLike[str] | None = None) -> Ed25519Signer:
    """The host's simulated attestation key, created (mode 0600) if the file does not exist.

    Creation is atomic: the key is written to a private temporary file and hard-linked into
    place, so concurrent first uses agree on one key and never see a half-written file.
    """
    target = Path(path) if path is not None else default_sim_key_path()
    if target.exists():
        return _read_key(target)
    try:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        signer, seed = Ed25519Signer.generate()
        tmp = target.parent / f".{target.name}.{secrets.token_hex(8)}.tmp"
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600
        )
        try:
            with os.fdopen(fd, "w", encoding="ascii") as handle:
                handle.write(
                    _KEY_PREFIX + base64.urlsafe_b64encode(seed).decode("ascii").rstrip("=") + "\n"
                )
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(tmp, target)
            except FileExistsError:
                return _read_key(target)  # someone else created it first: use theirs
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the sim attestation key {target}: {exc.strerror}; set "
            f"{SIM_KEY_ENV} or pass key_path to a writable location"
        ) from exc
    return signer


# -- evidence format ------------------------------------------------------------------------------


def _status_code(status: str) -> int:
    names: tuple[str, ...] = TCB_STATUSES
    return names.index(status)


@dataclass(frozen=True, slots=True)
class _SimBody:
    attributes: bytes
    mrenclave: bytes
    mrsigner: bytes
    isv_prod_id: int
    isv_svn: int
    tcb_status: str
    report_data: bytes
    public_key: bytes
    role: str
    advisory_ids: tuple[str, ...]

    def encode(self) -> bytes:
        out = bytearray(SIM_EVIDENCE_MAGIC)
        out += _HEAD.pack(
            self.attributes,
            self.mrenclave,
            self.mrsigner,
            self.isv_prod_id,
            self.isv_svn,
            _status_code(self.tcb_status),
            self.report_data,
            self.public_key,
        )
        role = self.role.encode("ascii")
        out += bytes([len(role)]) + role
        out += bytes([len(self.advisory_ids)])
        for advisory in self.advisory_ids:
            raw = advisory.encode("ascii")
            out += bytes([len(raw)]) + raw
        return bytes(out)


def _decode(data: bytes) -> tuple[_SimBody, bytes, bytes]:
    """Parse sim evidence into (body, signed bytes, signature). Raises EvidenceError."""

    def bad(why: str) -> EvidenceError:
        return EvidenceError(f"malformed sim evidence: {why}")

    if not data.startswith(SIM_EVIDENCE_MAGIC):
        raise bad("it does not start with the sim evidence magic")
    offset = len(SIM_EVIDENCE_MAGIC)
    if len(data) < offset + _HEAD.size + 2 + ED25519_SIGNATURE_SIZE:
        raise bad("too short")
    (attributes, mrenclave, mrsigner, prod_id, svn, status, report_data, public_key) = (
        _HEAD.unpack_from(data, offset)
    )
    offset += _HEAD.size
    if status >= len(TCB_STATUSES):
        raise bad(f"unknown TCB status code {status}")

    def take_string(pattern: re.Pattern[str], what: str) -> str:
        nonlocal offset
        if offset >= len(data):
            raise bad(f"truncated {what}")
        length = data[offset]
        offset += 1
        raw = data[offset : offset + length]
        if len(raw) != length:
            raise bad(f"truncated {what}")
        offset += length
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError as exc:
            raise bad(f"{what} is not ASCII") from exc
        if not pattern.fullmatch(text):
            raise bad(f"invalid {what}")
        return text

    role = take_string(_ROLE, "role")
    if offset >= len(data):
        raise bad("truncated advisories")
    count = data[offset]
    offset += 1
    if count > _MAX_ADVISORIES:
        raise bad("too many advisories")
    advisories = [take_string(_ADVISORY, "advisory id") for _ in range(count)]
    if len(data) - offset != ED25519_SIGNATURE_SIZE:
        raise bad("wrong length (trailing or missing bytes)")
    body = _SimBody(
        attributes=attributes,
        mrenclave=mrenclave,
        mrsigner=mrsigner,
        isv_prod_id=prod_id,
        isv_svn=svn,
        tcb_status=TCB_STATUSES[status],
        report_data=report_data,
        public_key=public_key,
        role=role,
        advisory_ids=tuple(advisories),
    )
    return body, data[:offset], data[offset:]


# -- attester and verifier ------------------------------------------------------------------------


class SimAttester:
    """Produces signed sim evidence for ``role`` (an :class:`EvidenceProvider`).

    ``debug``, ``tcb_status``, ``advisory_ids``, ``isv_prod_id`` and ``isv_svn`` exist so tests
    can produce evidence a policy must refuse; the defaults describe a production-like enclave.
    """

    evidence_type: EvidenceType = "sim"

    def __init__(
        self,
        role: str = "app",
        key_path: str | os.PathLike[str] | None = None,
        *,
        debug: bool = False,
        tcb_status: str = "UpToDate",
        advisory_ids: Iterable[str] = (),
        isv_prod_id: int = 0,
        isv_svn: int = 0,
        package_root: str | os.PathLike[str] | None = None,
    ) -> None:
        self.role = _check_role(role)
        self.key_path = Path(key_path) if key_path is not None else default_sim_key_path()
        if tcb_status not in TCB_STATUSES:
            raise ConfigError(f"tcb_status must be one of {', '.join(TCB_STATUSES)}")
        advisories = tuple(advisory_ids)
        candidates: tuple[object, ...] = advisories
        if len(advisories) > _MAX_ADVISORIES or not all(
            isinstance(a, str) and _ADVISORY.fullmatch(a) for a in candidates
        ):
            raise ConfigError("advisory ids must be short ASCII ids like INTEL-SA-00615")
        numbers: tuple[tuple[str, object], ...] = (
            ("isv_prod_id", isv_prod_id),
            ("isv_svn", isv_svn),
        )
        for name, value in numbers:
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFFFF:
                raise ConfigError(f"{name} must be an integer from 0 to 65535")
        self.debug = debug
        self.tcb_status = tcb_status
        self.advisory_ids = advisories
        self.isv_prod_id = isv_prod_id
        self.isv_svn = isv_svn
        self._package_root = package_root
        self._lock = threading.Lock()
        self._signer: Ed25519Signer | None = None
        self._mrenclave: str | None = None

    @property
    def mrenclave(self) -> str:
        """This attester's measurement (computed once, at first use)."""
        if self._mrenclave is None:
            self._mrenclave = measure(self.role, package_root=self._package_root)
        return self._mrenclave

    @property
    def public_key(self) -> str:
        """The attestation public key (``ed25519:<hex>``) a verifier must trust."""
        return format_sim_public_key(self._key().public_key)

    def _key(self) -> Ed25519Signer:
        with self._lock:
            if self._signer is None:
                self._signer = load_or_create_sim_key(self.key_path)
            return self._signer

    def evidence(self, report_data: bytes) -> Evidence:
        data = require_report_data(report_data)
        signer = self._key()
        attributes = bytes([_ATTR_INIT_MODE64 | (_ATTR_DEBUG if self.debug else 0)]) + bytes(
            [0] * 7 + [0x03] + [0] * 7
        )
        body = _SimBody(
            attributes=attributes,
            mrenclave=bytes.fromhex(self.mrenclave),
            mrsigner=bytes.fromhex(SIM_MRSIGNER),
            isv_prod_id=self.isv_prod_id,
            isv_svn=self.isv_svn,
            tcb_status=self.tcb_status,
            report_data=data,
            public_key=signer.public_key,
            role=self.role,
            advisory_ids=self.advisory_ids,
        ).encode()
        return Evidence(type="sim", data=body + signer.sign(_SIGN_TAG + body))

    def __repr__(self) -> str:
        return f"SimAttester(role={self.role!r}, key_path={str(self.key_path)!r})"


class SimVerifier:
    """Verifies sim evidence signed by one of ``trusted_keys`` (``ed25519:<hex>`` or raw)."""

    evidence_types: frozenset[EvidenceType] = frozenset({"sim"})

    def __init__(self, *, trusted_keys: Iterable[str | bytes]) -> None:
        keys = frozenset(parse_sim_public_key(key) for key in trusted_keys)
        if not keys:
            raise ConfigError(
                "a sim verifier needs at least one trusted sim attestation public key "
                "(`sealtorch attest sim-key --show-public` on the TEE host prints it)"
            )
        self.trusted_keys = keys

    def __repr__(self) -> str:
        return f"SimVerifier({len(self.trusted_keys)} trusted key(s))"

    def verify(self, evidence: Evidence, *, now: datetime) -> Claims:
        now = _aware(now)
        if evidence.type != "sim":
            raise UnsupportedEvidenceError(
                evidence.type, f"the sim verifier does not verify {evidence.type!r} evidence"
            )
        body, signed, signature = _decode(evidence.data)
        if body.public_key not in self.trusted_keys:
            raise UntrustedAttestationKeyError(
                "sim evidence is signed by an untrusted attestation key "
                f"{format_sim_public_key(body.public_key)}; add it to the trusted sim keys only "
                "if that host is yours"
            )
        try:
            ed25519_verify(body.public_key, signature, _SIGN_TAG + signed)
        except BadSignature as exc:
            raise EvidenceError("sim evidence signature is invalid") from exc
        if len(body.report_data) != REPORT_DATA_SIZE:  # pragma: no cover - fixed by layout
            raise EvidenceError("malformed sim evidence")
        return Claims(
            tee="sim",
            evidence_type="sim",
            simulated=True,
            debug=bool(body.attributes[0] & _ATTR_DEBUG),
            report_data=body.report_data,
            evidence_digest=hashlib.sha256(evidence.data).hexdigest(),
            tcb_status=body.tcb_status,
            advisory_ids=body.advisory_ids,
            verified_at=now,
            mrenclave=body.mrenclave.hex(),
            mrsigner=body.mrsigner.hex(),
            isv_prod_id=body.isv_prod_id,
            isv_svn=body.isv_svn,
            attributes=body.attributes.hex(),
            sim_role=body.role,
            attestation_key=format_sim_public_key(body.public_key),
        )
