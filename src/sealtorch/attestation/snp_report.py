"""The AMD SEV-SNP attestation report (SNP ABI spec 56860, ATTESTATION_REPORT) and the
certificate table that comes with an extended report.

SNP evidence is the 1,184-byte report, optionally followed by the host's certificate table
exactly as the kernel hands it over (configfs-tsm ``auxblob``, or the ``SNP_GET_EXT_REPORT``
certificate buffer): 24-byte entries ``GUID ‖ offset (u32 LE) ‖ length (u32 LE)`` ended by an
all-zero entry, offsets counted from the start of the table. Only the VCEK or VLEK is taken
from it; the ASK and ARK always come from the verifier's own collateral.

:func:`parse_report` accepts report versions 2 to 5 (versions 3 and 4 share a layout and add
the CPUID fields; 5 adds the mitigation vectors), signature algorithm 1 (ECDSA P-384 with
SHA-384) only, and refuses any reserved field or bit that is not zero: what it does not
understand, it does not accept.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from typing import Final, Literal

from sealtorch.errors import EvidenceError

__all__ = [
    "GUEST_POLICY_DEBUG",
    "GUEST_POLICY_MIGRATE_MA",
    "GUEST_POLICY_SMT",
    "PLATFORM_SMT_ENABLED",
    "REPORT_SIZE",
    "SIGNED_SIZE",
    "SnpReport",
    "TcbVersion",
    "build_cert_table",
    "parse_cert_table",
    "parse_report",
    "split_evidence",
    "trim_cert_table",
]

REPORT_SIZE: Final = 0x4A0  # 1184
#: The signature covers bytes 0x000-0x29F.
SIGNED_SIZE: Final = 0x2A0
SIGNATURE_R: Final = slice(0x2A0, 0x2A0 + 72)
SIGNATURE_S: Final = slice(0x2E8, 0x2E8 + 72)
_SIGNATURE_RESERVED: Final = slice(0x2E8 + 72, REPORT_SIZE)
_VERSIONS: Final = frozenset({2, 3, 4, 5})
_SIG_ALGO_ECDSA_P384_SHA384: Final = 1

# Guest policy (SNP ABI, Table 9): bits 15:0 ABI version, then the flags below.
GUEST_POLICY_SMT: Final = 1 << 16
_GUEST_POLICY_RESERVED_ONE: Final = 1 << 17
GUEST_POLICY_MIGRATE_MA: Final = 1 << 18
GUEST_POLICY_DEBUG: Final = 1 << 19
_GUEST_POLICY_KNOWN: Final = (1 << 26) - 1  # through PAGE_SWAP_DISABLE (bit 25)
# PLATFORM_INFO bit 0: SMT is enabled on the host.
PLATFORM_SMT_ENABLED: Final = 1 << 0
_PLATFORM_INFO_KNOWN: Final = (1 << 8) - 1
# The u32 at 0x48: AUTHOR_KEY_EN (bit 0), MASK_CHIP_KEY (bit 1), SIGNING_KEY (bits 4:2).
_KEY_INFO_KNOWN: Final = 0x1F
_SIGNING_KEYS: Final[dict[int, Literal["vcek", "vlek"]]] = {0: "vcek", 1: "vlek"}

GUID_VCEK: Final = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
GUID_VLEK: Final = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
GUID_ASK: Final = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
GUID_ARK: Final = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")
_MAX_TABLE_ENTRIES: Final = 32


@dataclass(frozen=True, slots=True)
class TcbVersion:
    """A TCB_VERSION decoded for its product (Turin adds the FMC and moves the fields)."""

    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None

    @classmethod
    def decode(cls, raw: bytes, *, turin: bool) -> TcbVersion:
        if len(raw) != 8:
            raise EvidenceError("a TCB_VERSION is 8 bytes")
        if turin:
            if any(raw[4:7]):
                raise EvidenceError("reserved bytes of a TCB_VERSION are not zero")
            return cls(fmc=raw[0], bootloader=raw[1], tee=raw[2], snp=raw[3], microcode=raw[7])
        if any(raw[2:6]):
            raise EvidenceError("reserved bytes of a TCB_VERSION are not zero")
        return cls(bootloader=raw[0], tee=raw[1], snp=raw[6], microcode=raw[7])

    def components(self) -> dict[str, int]:
        values = {
            "bootloader": self.bootloader,
            "tee": self.tee,
            "snp": self.snp,
            "microcode": self.microcode,
        }
        if self.fmc is not None:
            values["fmc"] = self.fmc
        return values


@dataclass(frozen=True, slots=True)
class SnpReport:
    """A parsed attestation report. Byte fields are raw; nothing here is verified."""

    raw: bytes
    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    current_tcb: bytes
    platform_info: int
    author_key_en: bool
    mask_chip_key: bool
    signing_key: Literal["vcek", "vlek"]
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    reported_tcb: bytes
    cpuid: tuple[int, int, int] | None
    chip_id: bytes
    committed_tcb: bytes
    launch_tcb: bytes

    @property
    def signed_bytes(self) -> bytes:
        return self.raw[:SIGNED_SIZE]

    @property
    def signature(self) -> tuple[int, int]:
        """(r, s) as integers (stored little-endian, 72 bytes each)."""
        return (
            int.from_bytes(self.raw[SIGNATURE_R], "little"),
            int.from_bytes(self.raw[SIGNATURE_S], "little"),
        )

    @property
    def debug(self) -> bool:
        return bool(self.policy & GUEST_POLICY_DEBUG)

    @property
    def migration_agent(self) -> bool:
        return bool(self.policy & GUEST_POLICY_MIGRATE_MA)

    @property
    def smt_enabled(self) -> bool:
        return bool(self.platform_info & PLATFORM_SMT_ENABLED)


def _zero(raw: bytes, start: int, end: int, what: str) -> None:
    if any(raw[start:end]):
        raise EvidenceError(
            f"the SNP report has non-zero reserved bytes ({what}, 0x{start:03X}-0x{end - 1:03X})"
        )


def parse_report(raw: bytes) -> SnpReport:
    """Parse and check the structure of a 1,184-byte report; raise EvidenceError otherwise."""
    if len(raw) != REPORT_SIZE:
        raise EvidenceError(f"an SNP report is {REPORT_SIZE} bytes, not {len(raw)}")
    version, guest_svn, policy = struct.unpack_from("<IIQ", raw, 0x00)
    if version not in _VERSIONS:
        raise EvidenceError(
            f"unknown SNP report version {version} (versions 2 to 5 are understood)"
        )
    vmpl, sig_algo, platform_info, key_info = struct.unpack_from("<IIxxxxxxxxQI", raw, 0x30)
    if sig_algo != _SIG_ALGO_ECDSA_P384_SHA384:
        raise EvidenceError(
            f"unknown SNP report signature algorithm {sig_algo} (only 1, ECDSA P-384, exists)"
        )
    if vmpl > 3:
        raise EvidenceError(f"the SNP report names VMPL {vmpl}; only 0 to 3 exist")
    if not policy & _GUEST_POLICY_RESERVED_ONE or policy & ~_GUEST_POLICY_KNOWN:
        raise EvidenceError(f"the SNP guest policy 0x{policy:x} has reserved bits wrong")
    if platform_info & ~_PLATFORM_INFO_KNOWN:
        raise EvidenceError(f"the SNP platform info 0x{platform_info:x} has unknown bits set")
    if key_info & ~_KEY_INFO_KNOWN:
        raise EvidenceError("the SNP report's key information has reserved bits set")
    signing = _SIGNING_KEYS.get((key_info >> 2) & 0x7)
    if signing is None:
        raise EvidenceError(
            "the SNP report is not signed by a VCEK or VLEK (SIGNING_KEY names no key): it "
            "cannot be verified"
        )
    _zero(raw, 0x4C, 0x50, "after key information")
    cpuid: tuple[int, int, int] | None = None
    if version == 2:
        _zero(raw, 0x188, 0x1A0, "before CHIP_ID")
    else:
        cpuid = (raw[0x188], raw[0x189], raw[0x18A])
        _zero(raw, 0x18B, 0x1A0, "before CHIP_ID")
    _zero(raw, 0x1EB, 0x1EC, "after CURRENT_VERSION")
    _zero(raw, 0x1EF, 0x1F0, "after COMMITTED_VERSION")
    _zero(raw, 0x1F8 if version < 5 else 0x208, SIGNED_SIZE, "after LAUNCH_TCB")
    _zero(raw, _SIGNATURE_RESERVED.start, _SIGNATURE_RESERVED.stop, "signature")
    return SnpReport(
        raw=bytes(raw),
        version=version,
        guest_svn=guest_svn,
        policy=policy,
        family_id=raw[0x10:0x20],
        image_id=raw[0x20:0x30],
        vmpl=vmpl,
        current_tcb=raw[0x38:0x40],
        platform_info=platform_info,
        author_key_en=bool(key_info & 0x1),
        mask_chip_key=bool(key_info & 0x2),
        signing_key=signing,
        report_data=raw[0x50:0x90],
        measurement=raw[0x90:0xC0],
        host_data=raw[0xC0:0xE0],
        id_key_digest=raw[0xE0:0x110],
        author_key_digest=raw[0x110:0x140],
        report_id=raw[0x140:0x160],
        reported_tcb=raw[0x180:0x188],
        cpuid=cpuid,
        chip_id=raw[0x1A0:0x1E0],
        committed_tcb=raw[0x1E0:0x1E8],
        launch_tcb=raw[0x1F0:0x1F8],
    )


def split_evidence(data: bytes) -> tuple[bytes, bytes]:
    """(report, certificate table) of SNP evidence; the table may be empty."""
    if len(data) < REPORT_SIZE:
        raise EvidenceError(
            f"SNP evidence is at least the {REPORT_SIZE}-byte report; got {len(data)} bytes"
        )
    return data[:REPORT_SIZE], data[REPORT_SIZE:]


def _guid(raw: bytes) -> uuid.UUID:
    # Linux and the GHCB spec differ in how tools print these GUIDs; accept either byte order.
    plain, mixed = uuid.UUID(bytes=raw), uuid.UUID(bytes_le=raw)
    for known in (GUID_VCEK, GUID_VLEK, GUID_ASK, GUID_ARK):
        if known in (plain, mixed):
            return known
    return plain


def parse_cert_table(table: bytes) -> dict[uuid.UUID, bytes]:
    """The certificates of a certificate table by GUID; ``{}`` for an empty table."""
    if not table or not any(table):
        return {}
    found: dict[uuid.UUID, bytes] = {}
    for index in range(_MAX_TABLE_ENTRIES + 1):
        start = index * 24
        if start + 24 > len(table):
            raise EvidenceError("the SNP certificate table is not terminated by a zero entry")
        entry = table[start : start + 24]
        if not any(entry):
            return found
        guid = _guid(entry[:16])
        offset, length = struct.unpack_from("<II", entry, 16)
        if offset < start + 24 or length == 0 or offset + length > len(table):
            raise EvidenceError("an SNP certificate table entry points outside the table")
        if guid in found:
            raise EvidenceError(f"the SNP certificate table lists {guid} twice")
        found[guid] = table[offset : offset + length]
    raise EvidenceError(f"the SNP certificate table has more than {_MAX_TABLE_ENTRIES} entries")


def trim_cert_table(table: bytes) -> bytes:
    """The table without the unused end of the buffer it came in (``b""`` when empty)."""
    certs = parse_cert_table(table)
    if not certs:
        return b""
    end = (len(certs) + 1) * 24
    for index in range(len(certs)):
        offset, length = struct.unpack_from("<II", table, index * 24 + 16)
        end = max(end, offset + length)
    return table[:end]


def build_cert_table(certs: dict[uuid.UUID, bytes]) -> bytes:
    """The kernel's certificate table layout for ``certs`` (GUIDs in RFC byte order)."""
    header = (len(certs) + 1) * 24
    entries, blobs = b"", b""
    for guid, der in certs.items():
        entries += guid.bytes + struct.pack("<II", header + len(blobs), len(der))
        blobs += der
    return entries + b"\0" * 24 + blobs
