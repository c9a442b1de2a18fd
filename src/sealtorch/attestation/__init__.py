"""Attestation: evidence providers, verifiers, collateral, claims and release policies.

Inside a TEE, an *evidence provider* binds 64 bytes of report_data into evidence::

    attester = attester_for("gramine")  # or "tdx", "snp", or "sim" (development)
    evidence = attester.evidence(report_data_for(nonce=n, hpke_suite=s, public_key=pk))

At the key server (or key cache), a *verifier* turns evidence into :class:`Claims`, and a
:class:`Policy` decides::

    verifiers = make_verifiers(pccs_url=url, sim_trusted_keys=[...])  # or explicitly:
    verifiers = VerifierSet(
        DcapVerifier(collateral=PccsCollateral(url, cache_dir=...)),
        SimVerifier(trusted_keys=["ed25519:..."]),  # only if sim hosts are trusted
    )
    claims = verifiers.verify(evidence, now=clock())
    decision = policy.evaluate(claims, now=clock(), expected_report_data=report_data)
    decision.raise_for_denial()

Details: ``docs/attestation.md`` (evidence, verification, collateral, the sim TEE) and
``docs/policy.md`` (policy schema and reason codes).
"""

from __future__ import annotations

from sealtorch.attestation.binding import (
    BINDING_DOMAIN_TAG,
    binding_reasons,
    report_data_for,
    verify_binding,
)
from sealtorch.attestation.claims import TCB_STATUSES, TEE_TYPES, Claims, TcbStatus, TeeType
from sealtorch.attestation.collateral import (
    INTEL_PCS_URL,
    Clock,
    Collateral,
    CollateralDirectory,
    CollateralFile,
    CollateralKey,
    CollateralSource,
    PccsCollateral,
    system_clock,
)
from sealtorch.attestation.config import default_collateral_cache_dir, make_verifiers
from sealtorch.attestation.dcap import DcapVerifier
from sealtorch.attestation.evidence import (
    EVIDENCE_TYPES,
    MAX_EVIDENCE_SIZE,
    REPORT_DATA_SIZE,
    Evidence,
    EvidenceProvider,
    EvidenceType,
    detect_evidence,
)
from sealtorch.attestation.policy import REASON_CODES, Decision, Policy
from sealtorch.attestation.providers import (
    ATTESTER_NAMES,
    GramineAttester,
    SnpAttester,
    TdxAttester,
    attester_for,
)
from sealtorch.attestation.sim import (
    KNOWN_ROLES,
    SIM_MRSIGNER,
    SimAttester,
    SimVerifier,
    default_sim_key_path,
    format_sim_public_key,
    load_or_create_sim_key,
    measure,
    parse_sim_public_key,
)
from sealtorch.attestation.snp import SnpVerifier
from sealtorch.attestation.snp_collateral import (
    AMD_KDS_URL,
    AMD_ROOTS,
    SnpCollateralDirectory,
    TrustedArks,
    fetch_from_kds,
)
from sealtorch.attestation.verifier import (
    UnsupportedEvidenceError,
    UntrustedAttestationKeyError,
    Verifier,
    VerifierSet,
    reason_for_error,
)

__all__ = [
    "AMD_KDS_URL",
    "AMD_ROOTS",
    "ATTESTER_NAMES",
    "BINDING_DOMAIN_TAG",
    "EVIDENCE_TYPES",
    "INTEL_PCS_URL",
    "KNOWN_ROLES",
    "MAX_EVIDENCE_SIZE",
    "REASON_CODES",
    "REPORT_DATA_SIZE",
    "SIM_MRSIGNER",
    "TCB_STATUSES",
    "TEE_TYPES",
    "Claims",
    "Clock",
    "Collateral",
    "CollateralDirectory",
    "CollateralFile",
    "CollateralKey",
    "CollateralSource",
    "DcapVerifier",
    "Decision",
    "Evidence",
    "EvidenceProvider",
    "EvidenceType",
    "GramineAttester",
    "PccsCollateral",
    "Policy",
    "SimAttester",
    "SimVerifier",
    "SnpAttester",
    "SnpCollateralDirectory",
    "SnpVerifier",
    "TcbStatus",
    "TdxAttester",
    "TeeType",
    "TrustedArks",
    "UnsupportedEvidenceError",
    "UntrustedAttestationKeyError",
    "Verifier",
    "VerifierSet",
    "attester_for",
    "binding_reasons",
    "default_collateral_cache_dir",
    "default_sim_key_path",
    "detect_evidence",
    "fetch_from_kds",
    "format_sim_public_key",
    "load_or_create_sim_key",
    "make_verifiers",
    "measure",
    "parse_sim_public_key",
    "reason_for_error",
    "report_data_for",
    "system_clock",
    "verify_binding",
]
