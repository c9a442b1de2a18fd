"""Release policy rules for AMD SEV-SNP guests (the ``snp:`` section of a policy).

::

    allowed_tees: [snp]
    snp:
      measurement: ["7a1e5c26...841f"]      # launch measurements allowed (48 bytes hex)
      host_data: ["00...00"]                # optional: HOST_DATA allowed (32 bytes)
      family_id: [...]                      # optional: ID block family / image ids (16 bytes)
      image_id: [...]
      id_key_digest: [...]                  # optional: ID block signing keys (48 bytes)
      author_key_digest: [...]              # optional: author keys (requires AUTHOR_KEY_EN)
      min_guest_svn: 0
      min_tcb: {bootloader: 3, tee: 0, snp: 8, microcode: 115}   # Turin: also fmc
      vmpl: 0                               # the VMPL that must have asked for the report
      allow_migration_agent: false
      allow_smt: false
      products: [Milan, Genoa, Turin]       # optional restriction

Debug guests are refused through the policy-wide ``allow_debug_enclave_insecure`` switch, like
SGX and TDX. See ``docs/policy.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Final, Literal

from pydantic import Field

from sealtorch.attestation._policy_fields import U8, U32, Hex16, Hex32, Hex48, StrictBool, _Schema
from sealtorch.attestation.claims import Claims

__all__ = ["SNP_REASON_CODES", "SnpRules", "SnpTcbMinimum", "check_snp"]

SNP_REASON_CODES: Final[dict[str, str]] = {
    "host_data_mismatch": "SNP HOST_DATA is not one the policy allows",
    "family_id_mismatch": "SNP FAMILY_ID (from the ID block) is not one the policy allows",
    "image_id_mismatch": "SNP IMAGE_ID (from the ID block) is not one the policy allows",
    "id_key_mismatch": "the SNP ID block was not signed by an ID key the policy pins",
    "author_key_mismatch": "the SNP ID key was not endorsed by an author key the policy pins",
    "guest_svn_too_low": "the SNP GUEST_SVN is below the policy's minimum",
    "tcb_below_minimum": "a component of the SNP reported_tcb (boot loader, TEE, SNP firmware, "
    "microcode, FMC) is below the policy's minimum",
    "migration_agent_not_allowed": "the SNP guest policy allows a migration agent and the "
    "release policy does not",
    "smt_not_allowed": "SMT is enabled on the SNP host and the policy does not allow it",
    "vmpl_mismatch": "the SNP report was requested from another VMPL than the policy requires",
    "product_not_allowed": "the SNP processor generation is not one the policy allows",
}

_SMT_ENABLED: Final = 1 << 0  # PLATFORM_INFO.SMT_EN
_MIGRATE_MA: Final = 1 << 18  # guest policy MIGRATE_MA


class SnpTcbMinimum(_Schema):
    """Minimum security patch level of each TCB component (reported_tcb)."""

    bootloader: U8 = 0
    tee: U8 = 0
    snp: U8 = 0
    microcode: U8 = 0
    #: Turin's firmware management controller; ignored on Milan and Genoa (they have none).
    fmc: U8 = 0


class SnpRules(_Schema):
    """Code identity pins and platform rules for SEV-SNP guests."""

    measurement: tuple[Hex48, ...] = ()
    host_data: tuple[Hex32, ...] = ()
    family_id: tuple[Hex16, ...] = ()
    image_id: tuple[Hex16, ...] = ()
    id_key_digest: tuple[Hex48, ...] = ()
    author_key_digest: tuple[Hex48, ...] = ()
    min_guest_svn: U32 = 0
    min_tcb: SnpTcbMinimum = SnpTcbMinimum()
    vmpl: Annotated[int, Field(strict=True, ge=0, le=3)] = 0
    allow_migration_agent: StrictBool = False
    allow_smt: StrictBool = False
    products: tuple[Literal["Milan", "Genoa", "Turin"], ...] = ()

    def identity_pinned(self) -> bool:
        return bool(self.measurement)


def _pinned(
    allowed: tuple[str, ...],
    value: str | None,
    code: str,
    what: str,
    deny: Callable[[str, str], None],
) -> None:
    if allowed and value not in allowed:
        deny(code, f"{what} {value} is not in the allowed list")


def check_snp(rules: SnpRules, claims: Claims, deny: Callable[[str, str], None]) -> None:
    """Every failing SNP rule, through ``deny(code, detail)``."""
    _pinned(
        rules.measurement, claims.launch_measurement, "measurement_mismatch", "MEASUREMENT", deny
    )
    _pinned(rules.host_data, claims.host_data, "host_data_mismatch", "HOST_DATA", deny)
    _pinned(rules.family_id, claims.family_id, "family_id_mismatch", "FAMILY_ID", deny)
    _pinned(rules.image_id, claims.image_id, "image_id_mismatch", "IMAGE_ID", deny)
    _pinned(rules.id_key_digest, claims.id_key_digest, "id_key_mismatch", "ID key digest", deny)
    if rules.author_key_digest and (
        not claims.author_key_enabled or claims.author_key_digest not in rules.author_key_digest
    ):
        deny(
            "author_key_mismatch",
            "the ID key is not endorsed by a pinned author key"
            + ("" if claims.author_key_enabled else " (the report has no author key)"),
        )
    if claims.guest_svn is None or claims.guest_svn < rules.min_guest_svn:
        deny(
            "guest_svn_too_low",
            f"GUEST_SVN {claims.guest_svn} is below the minimum {rules.min_guest_svn}",
        )
    reported = {
        "bootloader": claims.tcb_bootloader,
        "tee": claims.tcb_tee,
        "snp": claims.tcb_snp,
        "microcode": claims.tcb_microcode,
    }
    if claims.tcb_fmc is not None:
        reported["fmc"] = claims.tcb_fmc
    low = [
        f"{name} {value} < {getattr(rules.min_tcb, name)}"
        for name, value in reported.items()
        if value is None or value < getattr(rules.min_tcb, name)
    ]
    if low:
        deny("tcb_below_minimum", f"reported_tcb is below the minimum: {', '.join(low)}")
    if (claims.guest_policy or 0) & _MIGRATE_MA and not rules.allow_migration_agent:
        deny(
            "migration_agent_not_allowed",
            "the guest policy allows a migration agent (it could export the guest's memory); "
            "set allow_migration_agent: true to accept that",
        )
    if (claims.platform_info or 0) & _SMT_ENABLED and not rules.allow_smt:
        deny(
            "smt_not_allowed",
            "SMT is enabled on the host (sibling hyper-threads may be shared with other "
            "tenants); set allow_smt: true to accept that",
        )
    if claims.vmpl != rules.vmpl:
        deny("vmpl_mismatch", f"the report comes from VMPL {claims.vmpl}, not {rules.vmpl}")
    if rules.products and claims.snp_product not in rules.products:
        deny(
            "product_not_allowed",
            f"{claims.snp_product} is not an allowed processor ({', '.join(rules.products)})",
        )
