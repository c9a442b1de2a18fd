"""Claims: the one normalised, typed result of verifying evidence from any TEE."""

from __future__ import annotations

import dataclasses
import operator
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal, TypeGuard

from sealtorch.attestation.evidence import EVIDENCE_TYPES, REPORT_DATA_SIZE, EvidenceType
from sealtorch.errors import EvidenceError

__all__ = [
    "TCB_STATUSES",
    "TEE_TYPES",
    "Claims",
    "TcbStatus",
    "TeeType",
    "normalise_tcb_status",
]

TeeType = Literal["sgx", "tdx", "snp", "sim"]
TEE_TYPES: Final[tuple[TeeType, ...]] = ("sgx", "tdx", "snp", "sim")

TcbStatus = Literal[
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
]
#: Intel's TCB status names, best first.
TCB_STATUSES: Final[tuple[TcbStatus, ...]] = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
)

_ALIASES: Final[dict[str, str]] = {
    **{name.lower(): name for name in TCB_STATUSES},
    "ok": "UpToDate",
    "sw_hardening_needed": "SWHardeningNeeded",
    "configuration_needed": "ConfigurationNeeded",
    "configuration_and_sw_hardening_needed": "ConfigurationAndSWHardeningNeeded",
    "out_of_date": "OutOfDate",
    "out_of_date_configuration_needed": "OutOfDateConfigurationNeeded",
    "revoked": "Revoked",
}


def normalise_tcb_status(raw: str) -> str:
    """Intel's spelling of a TCB status (``OK``/``SW_HARDENING_NEEDED``... → ``UpToDate``...).

    Unknown statuses are returned unchanged; a policy can only accept the seven known names,
    so an unknown status is never accepted.
    """
    return _ALIASES.get(raw.strip().lower(), raw.strip())


def _is_tee(value: object) -> TypeGuard[TeeType]:
    return isinstance(value, str) and value in TEE_TYPES


def _is_evidence_type(value: object) -> TypeGuard[EvidenceType]:
    return isinstance(value, str) and value in EVIDENCE_TYPES


_HEX_FIELDS: Final[dict[str, int]] = {
    # field -> size in bytes
    "mrenclave": 32,
    "mrsigner": 32,
    "attributes": 16,
    "mrtd": 48,
    "rtmr0": 48,
    "rtmr1": 48,
    "rtmr2": 48,
    "rtmr3": 48,
    "td_attributes": 8,
    "mrconfigid": 48,
    "mrowner": 48,
    "mrownerconfig": 48,
    "mrseam": 48,
    "xfam": 8,
    "evidence_digest": 32,
    "fmspc": 6,
    "launch_measurement": 48,
    "host_data": 32,
    "family_id": 16,
    "image_id": 16,
    "id_key_digest": 48,
    "author_key_digest": 48,
    "chip_id": 64,
    "reported_tcb": 8,
}
#: field -> its compiled pattern (claims are built on every release: no per-call compile).
_HEX_PATTERNS: Final[dict[str, re.Pattern[str]]] = {
    name: re.compile(f"[0-9a-f]{{{2 * size}}}") for name, size in _HEX_FIELDS.items()
}
_INT_FIELDS: Final[dict[str, int]] = {
    # field -> largest value
    "isv_prod_id": 0xFFFF,
    "isv_svn": 0xFFFF,
    "guest_svn": 0xFFFFFFFF,
    "vmpl": 3,
    "guest_policy": 2**64 - 1,
    "platform_info": 2**64 - 1,
    "tcb_bootloader": 0xFF,
    "tcb_tee": 0xFF,
    "tcb_snp": 0xFF,
    "tcb_microcode": 0xFF,
    "tcb_fmc": 0xFF,
}
_DATE_FIELDS: Final = ("verified_at", "collateral_issued_at", "collateral_next_update")


@dataclass(frozen=True, slots=True, kw_only=True)
class Claims:
    """What verified evidence proves, the same shape for every TEE.

    Measurements are lowercase hex strings (``None`` when the TEE has no such field); times are
    timezone-aware UTC. Only a :class:`~sealtorch.attestation.Verifier` should build claims: a
    ``Claims`` object means "this evidence verified".
    """

    tee: TeeType
    evidence_type: EvidenceType
    #: True for the software TEE: nothing hardware-backed about it.
    simulated: bool
    #: The enclave/TD runs in debug mode: its memory is readable by the host.
    debug: bool
    #: The 64 bytes the attester bound into the evidence (see ``report_data_for``).
    report_data: bytes
    #: SHA-256 of the evidence bytes, hex.
    evidence_digest: str
    #: Intel's TCB status name (``UpToDate``, ``SWHardeningNeeded``, ...).
    tcb_status: str
    advisory_ids: tuple[str, ...] = ()
    #: The verifier's clock when the evidence was verified.
    verified_at: datetime
    #: Validity window of the collateral used (DCAP); ``None`` for sim.
    collateral_issued_at: datetime | None = None
    collateral_next_update: datetime | None = None
    #: Platform family id from the PCK certificate (DCAP).
    fmspc: str | None = None
    # SGX (and sim)
    mrenclave: str | None = None
    mrsigner: str | None = None
    isv_prod_id: int | None = None
    isv_svn: int | None = None
    attributes: str | None = None
    # TDX
    mrtd: str | None = None
    rtmr0: str | None = None
    rtmr1: str | None = None
    rtmr2: str | None = None
    rtmr3: str | None = None
    td_attributes: str | None = None
    mrconfigid: str | None = None
    mrowner: str | None = None
    mrownerconfig: str | None = None
    mrseam: str | None = None
    xfam: str | None = None
    # SEV-SNP (see docs/attestation.md for each field)
    #: Milan, Genoa or Turin (from the endorsement key's AMD chain).
    snp_product: str | None = None
    #: ``vcek`` or ``vlek``: which AMD key signed the report.
    snp_signing_key: str | None = None
    #: MEASUREMENT: the launch digest of the VM's initial memory (firmware, kernel...).
    launch_measurement: str | None = None
    host_data: str | None = None
    family_id: str | None = None
    image_id: str | None = None
    id_key_digest: str | None = None
    author_key_digest: str | None = None
    author_key_enabled: bool | None = None
    chip_id: str | None = None
    #: The TCB_VERSION the report (and the VCEK) is for, as in the report (8 bytes hex).
    reported_tcb: str | None = None
    guest_svn: int | None = None
    vmpl: int | None = None
    guest_policy: int | None = None
    platform_info: int | None = None
    #: reported_tcb decoded for the product (the security patch levels).
    tcb_bootloader: int | None = None
    tcb_tee: int | None = None
    tcb_snp: int | None = None
    tcb_microcode: int | None = None
    #: Turin only.
    tcb_fmc: int | None = None
    # sim
    #: The sim role (``keycache``, ``serve``, ...) the measurement was taken for.
    sim_role: str | None = None
    #: The simulated attestation key that signed the evidence (``ed25519:<hex>``).
    attestation_key: str | None = None

    def __post_init__(self) -> None:
        if not _is_tee(self.tee):
            raise EvidenceError(f"unknown TEE type {self.tee!r}")
        if not _is_evidence_type(self.evidence_type):
            raise EvidenceError(f"unknown evidence type {self.evidence_type!r}")
        flags: tuple[object, ...] = (self.simulated, self.debug)
        if not all(isinstance(flag, bool) for flag in flags):
            raise EvidenceError("claims simulated and debug must be booleans")
        author: object = self.author_key_enabled
        if author is not None and not isinstance(author, bool):
            raise EvidenceError("claim author_key_enabled must be a boolean")
        for name, largest in _INT_FIELDS.items():
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= largest
            ):
                raise EvidenceError(f"claim {name} must be an integer from 0 to {largest}")
        texts: tuple[object, ...] = (self.tcb_status, *self.advisory_ids)
        if not all(isinstance(item, str) for item in texts):
            raise EvidenceError("claims tcb_status and advisory_ids must be strings")
        report_data: object = self.report_data
        if not isinstance(report_data, bytes) or len(report_data) != REPORT_DATA_SIZE:
            raise EvidenceError(f"report_data must be {REPORT_DATA_SIZE} bytes")
        for name, pattern in _HEX_PATTERNS.items():
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not pattern.fullmatch(value)):
                raise EvidenceError(
                    f"claim {name} must be {_HEX_FIELDS[name]} bytes of lowercase hex"
                )
        for name in _DATE_FIELDS:
            value = getattr(self, name)
            if value is not None and (value.tzinfo is None or value.utcoffset() is None):
                raise EvidenceError(f"claim {name} must be a timezone-aware datetime")

    @property
    def measurement(self) -> str | None:
        """The primary code measurement: MRENCLAVE (SGX, sim), MRTD (TDX) or the launch
        measurement (SNP)."""
        if self.tee == "snp":
            return self.launch_measurement
        return self.mrtd if self.tee == "tdx" else self.mrenclave

    @property
    def rtmrs(self) -> tuple[str | None, str | None, str | None, str | None]:
        return (self.rtmr0, self.rtmr1, self.rtmr2, self.rtmr3)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (bytes as hex, times as ISO 8601 UTC); inverse of :meth:`from_dict`.

        On every release (its audit record): the fields are read at once and only values that
        are not None, str, int or bool are converted (the same text as converting each field).
        """
        out = dict(zip(_FIELD_NAMES, _field_values(self), strict=True))
        for name, value in out.items():
            if value is not None and type(value) not in _PLAIN:
                out[name] = _jsonable(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Claims:
        """Rebuild claims recorded with :meth:`to_dict` (e.g. for a renewal session).

        Only use this on records sealtorch itself stored; it checks shapes, not signatures.
        """
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise EvidenceError(f"unknown claim field(s): {', '.join(unknown)}")
        values: dict[str, Any] = dict(data)
        try:
            values["report_data"] = bytes.fromhex(values["report_data"])
            values["advisory_ids"] = tuple(values.get("advisory_ids") or ())
            for name in _DATE_FIELDS:
                if values.get(name) is not None:
                    parsed = datetime.fromisoformat(values[name])
                    if parsed.tzinfo is None:
                        raise ValueError(f"{name} has no timezone")
                    values[name] = parsed.astimezone(UTC)
            return cls(**values)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise EvidenceError(f"recorded claims are malformed: {exc}") from exc


#: The claim fields in order, and one getter of all their values (:meth:`Claims.to_dict`).
_FIELD_NAMES: Final[tuple[str, ...]] = tuple(field.name for field in dataclasses.fields(Claims))
_field_values: Final = operator.attrgetter(*_FIELD_NAMES)
#: Value types a claim dict holds as they are.
_PLAIN: Final = frozenset({str, int, bool, float})


def _jsonable(value: object) -> object:
    """One claim value as :meth:`Claims.to_dict` writes it."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, tuple):
        return list(value)
    return value
