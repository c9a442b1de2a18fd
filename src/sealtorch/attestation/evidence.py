"""Evidence: what an enclave sends to prove what it runs, and the interface that produces it."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import struct
from dataclasses import dataclass
from typing import Final, Literal, Protocol, TypeGuard, runtime_checkable

from sealtorch.errors import EvidenceError

__all__ = [
    "EVIDENCE_TYPES",
    "MAX_EVIDENCE_SIZE",
    "REPORT_DATA_SIZE",
    "SIM_EVIDENCE_MAGIC",
    "Evidence",
    "EvidenceProvider",
    "EvidenceType",
    "detect_evidence",
    "require_report_data",
]

EvidenceType = Literal["sgx-dcap", "tdx-dcap", "sev-snp", "sim"]
EVIDENCE_TYPES: Final[tuple[EvidenceType, ...]] = ("sgx-dcap", "tdx-dcap", "sev-snp", "sim")

#: Largest evidence accepted anywhere (a DCAP quote with its PCK chain is about 5 KiB).
MAX_EVIDENCE_SIZE: Final = 48 * 1024
#: Size of the report_data every TEE binds into its evidence.
REPORT_DATA_SIZE: Final = 64
#: First bytes of simulated-TEE evidence (see ``docs/attestation.md``).
SIM_EVIDENCE_MAGIC: Final = b"SEALTORCH-SIM-EVIDENCE-V1\x00"

_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_TEE_TYPE_SGX: Final = 0x00000000
_TEE_TYPE_TDX: Final = 0x00000081
_SNP_REPORT_SIZE: Final = 1184
_SNP_VERSIONS: Final = (2, 3, 4, 5)


def _is_evidence_type(value: object) -> TypeGuard[EvidenceType]:
    return isinstance(value, str) and value in EVIDENCE_TYPES


@dataclass(frozen=True, slots=True)
class Evidence:
    """Attestation evidence: its type and its raw bytes (a DCAP quote, an SEV-SNP report with
    its certificate table, or sim evidence).

    Construction validates the type and the size; it does not verify anything (that is a
    :class:`~sealtorch.attestation.Verifier`'s job).
    """

    type: EvidenceType
    data: bytes

    def __post_init__(self) -> None:
        if not _is_evidence_type(self.type):
            raise EvidenceError(
                f"unknown evidence type {self.type!r}; expected one of {', '.join(EVIDENCE_TYPES)}"
            )
        if not isinstance(self.data, bytes):
            raise EvidenceError("evidence data must be bytes")
        if not self.data:
            raise EvidenceError("evidence is empty")
        if len(self.data) > MAX_EVIDENCE_SIZE:
            raise EvidenceError(
                f"evidence is {len(self.data)} bytes; at most {MAX_EVIDENCE_SIZE} are accepted"
            )

    @property
    def digest(self) -> str:
        """SHA-256 of :attr:`data`, hex (what the audit log records; ``sha256sum`` of a quote)."""
        return hashlib.sha256(self.data).hexdigest()

    def to_wire(self) -> dict[str, str]:
        """The JSON form used by the key release protocol: data as base64url without padding."""
        return {
            "type": self.type,
            "data": base64.urlsafe_b64encode(self.data).decode("ascii").rstrip("="),
        }

    @classmethod
    def from_wire(cls, obj: object) -> Evidence:
        """Parse and validate the JSON form (a dict, or its JSON text)."""
        if isinstance(obj, str | bytes):
            try:
                obj = json.loads(obj)
            except (ValueError, UnicodeDecodeError) as exc:
                raise EvidenceError("evidence is not valid JSON") from exc
        if not isinstance(obj, dict):
            raise EvidenceError('evidence must be an object {"type": ..., "data": ...}')
        if set(obj) != {"type", "data"}:
            extra = sorted(set(obj) - {"type", "data"})
            missing = sorted({"type", "data"} - set(obj))
            detail = f"unknown field(s) {extra}" if extra else f"missing field(s) {missing}"
            raise EvidenceError(f'evidence must have exactly "type" and "data": {detail}')
        kind, text = obj["type"], obj["data"]
        if not _is_evidence_type(kind):
            raise EvidenceError(
                f"evidence.type must be one of {', '.join(EVIDENCE_TYPES)}, not {kind!r}"
            )
        if not isinstance(text, str) or not _B64URL.fullmatch(text) or len(text) % 4 == 1:
            raise EvidenceError("evidence.data must be base64url without padding")
        if len(text) > (MAX_EVIDENCE_SIZE * 4 + 2) // 3:
            raise EvidenceError(f"evidence is larger than {MAX_EVIDENCE_SIZE} bytes")
        try:
            data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except (binascii.Error, ValueError) as exc:
            raise EvidenceError("evidence.data is not valid base64url") from exc
        if base64.urlsafe_b64encode(data).decode("ascii").rstrip("=") != text:
            raise EvidenceError("evidence.data is not canonical base64url")
        return cls(type=kind, data=data)

    def __repr__(self) -> str:
        return f"Evidence(type={self.type!r}, {len(self.data)} bytes, sha256={self.digest[:16]})"


def require_report_data(report_data: bytes) -> bytes:
    """Check that ``report_data`` is exactly 64 bytes (what every provider binds)."""
    if not isinstance(report_data, bytes | bytearray | memoryview):
        raise EvidenceError("report_data must be bytes")
    data = bytes(report_data)
    if len(data) != REPORT_DATA_SIZE:
        raise EvidenceError(
            f"report_data must be exactly {REPORT_DATA_SIZE} bytes, not {len(data)} "
            "(use sealtorch.attestation.report_data_for to build it)"
        )
    return data


@runtime_checkable
class EvidenceProvider(Protocol):
    """Produces evidence binding 64 bytes of report_data, from inside a TEE (an *attester*).

    Implementations: :class:`~sealtorch.attestation.GramineAttester`,
    :class:`~sealtorch.attestation.TdxAttester`, :class:`~sealtorch.attestation.SimAttester`.
    They raise :class:`~sealtorch.errors.EvidenceError` when the device is absent or refuses.
    """

    @property
    def evidence_type(self) -> EvidenceType:
        """The type of evidence this provider produces."""
        ...

    def evidence(self, report_data: bytes) -> Evidence:
        """Evidence whose report_data is exactly ``report_data`` (64 bytes)."""
        ...


def detect_evidence(raw: bytes) -> Evidence:
    """Recognise evidence in a file's bytes, for the CLI and for tools.

    Accepts: the JSON wire form; simulated-TEE evidence; a binary DCAP quote (SGX v3/v5 or
    TDX v4/v5, told apart by the header's TEE type); an SEV-SNP attestation report (versions
    2-5, signature algorithm 1), optionally followed by its certificate table; or any of these
    binary forms as hex text, with or without ``0x`` and surrounding whitespace.
    """
    if not raw:
        raise EvidenceError("the evidence file is empty")
    stripped = raw.strip()
    if stripped.startswith(b"{"):
        return Evidence.from_wire(stripped)
    if raw.startswith(SIM_EVIDENCE_MAGIC):
        return Evidence(type="sim", data=bytes(raw))
    text = stripped[2:] if stripped[:2] in (b"0x", b"0X") else stripped
    if text and re.fullmatch(rb"[0-9a-fA-F\s]+", text):
        compact = re.sub(rb"\s+", b"", text)
        if len(compact) % 2:
            raise EvidenceError("the evidence file looks like hex but has an odd number of digits")
        return detect_evidence(binascii.unhexlify(compact))
    if len(raw) >= _SNP_REPORT_SIZE:
        # An SNP report starts with a u32 version (so bytes 2-3 are zero, where a DCAP quote
        # has its nonzero attestation key type) and has signature algorithm 1 at 0x34.
        snp_version, snp_algo = struct.unpack_from("<I", raw, 0)[0], raw[0x34:0x38]
        if snp_version in _SNP_VERSIONS and snp_algo == b"\x01\0\0\0":
            return Evidence(type="sev-snp", data=bytes(raw))
    if len(raw) >= 8:
        version, _key_type, tee_type = struct.unpack_from("<HHI", raw, 0)
        if version in (3, 4, 5) and tee_type == _TEE_TYPE_SGX:
            return Evidence(type="sgx-dcap", data=bytes(raw))
        if version in (4, 5) and tee_type == _TEE_TYPE_TDX:
            return Evidence(type="tdx-dcap", data=bytes(raw))
    raise EvidenceError(
        "not recognised as evidence: expected a DCAP quote or an SEV-SNP report (binary or "
        'hex), simulated-TEE evidence, or the JSON form {"type": ..., "data": ...}'
    )
