"""The ``dcap`` verifier: Intel SGX (quote v3) and TDX (quote v4/v5) through ``dcap-qvl``."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any, Final

import dcap_qvl

from sealtorch.attestation.claims import Claims, normalise_tcb_status
from sealtorch.attestation.collateral import CollateralKey, CollateralSource, _aware
from sealtorch.attestation.evidence import Evidence, EvidenceType
from sealtorch.attestation.verifier import UnsupportedEvidenceError
from sealtorch.errors import CollateralError, ConfigError, EvidenceError

__all__ = ["DcapVerifier"]

_SGX_DEBUG: Final = 0x02  # ATTRIBUTES.DEBUG, bit 1 of the first byte
_STALE_MARKERS: Final = (
    "crlexpired",
    "tcbinfo expired",
    "qe identity expired",
    "collateral expired",
)
_COLLATERAL_MARKERS: Final = (
    "quote_collateral",
    "tcbinfo",
    "tcb info",
    "qe identity",
    "qeidentity",
    "crl",
)


def _classify(exc: ValueError) -> CollateralError | EvidenceError:
    message = str(exc).removeprefix("Verification failed: ")
    lowered = message.lower()
    if any(marker in lowered for marker in _STALE_MARKERS):
        return CollateralError(
            f"collateral is stale ({message}); fetch current collateral", stale=True
        )
    if "in the future" in lowered:
        return CollateralError(f"collateral is not valid yet ({message}); check the clock")
    if any(marker in lowered for marker in _COLLATERAL_MARKERS):
        return CollateralError(f"collateral failed verification: {message}")
    return EvidenceError(f"the quote failed verification: {message}")


def _td_report(report: dict[str, Any]) -> dict[str, Any]:
    """The TDREPORT fields of a TD10 / TD15 / TD15Ex report (the latter nest ``base``)."""
    current = report
    for _ in range(4):
        if "mr_td" in current:
            return current
        base = current.get("base")
        if not isinstance(base, dict):
            break
        current = base
    raise EvidenceError("the TDX quote's report has no MRTD")


class DcapVerifier:
    """Verifies ``sgx-dcap`` and ``tdx-dcap`` evidence with Intel-signed collateral.

    The collateral source supplies the collateral for the quote's platform (FMSPC and PCK CA);
    stale collateral raises :class:`~sealtorch.errors.CollateralError` with ``stale=True``,
    anything wrong with the quote raises :class:`~sealtorch.errors.EvidenceError`. Time is the
    caller's ``now`` (the verifier's clock), never the attester's.
    """

    evidence_types: frozenset[EvidenceType] = frozenset({"sgx-dcap", "tdx-dcap"})

    def __init__(self, *, collateral: CollateralSource) -> None:
        self.collateral = collateral

    def __repr__(self) -> str:
        return f"DcapVerifier(collateral={self.collateral!r})"

    def verify(self, evidence: Evidence, *, now: datetime) -> Claims:
        now = _aware(now)
        if evidence.type not in self.evidence_types:
            raise UnsupportedEvidenceError(
                evidence.type, f"the dcap verifier does not verify {evidence.type!r} evidence"
            )
        data = evidence.data
        try:
            quote = dcap_qvl.parse_quote(data)
            is_tdx = quote.is_tdx()
        except ValueError as exc:
            raise EvidenceError(f"not a valid DCAP quote: {exc}") from exc
        actual: EvidenceType = "tdx-dcap" if is_tdx else "sgx-dcap"
        if actual != evidence.type:
            raise EvidenceError(
                f"the evidence is labelled {evidence.type!r} but is a {actual} quote"
            )
        try:
            fmspc = quote.fmspc().upper()
            ca = quote.ca()
        except ValueError as exc:
            raise EvidenceError(
                f"the quote's PCK certificate chain is missing or unreadable: {exc}"
            ) from exc
        if ca not in ("processor", "platform"):
            raise EvidenceError(f"the quote's PCK certificate names an unknown CA {ca!r}")
        try:
            key = CollateralKey(
                tee="tdx" if is_tdx else "sgx",
                fmspc=fmspc,
                ca="processor" if ca == "processor" else "platform",
            )
        except ConfigError as exc:
            raise EvidenceError(f"the quote names an unknown platform: {exc}") from exc
        collateral = self.collateral.collateral_for(key, now=now).require_fresh(now)
        try:
            verified = dcap_qvl.verify(data, collateral.qvl, int(now.timestamp()))
            result = json.loads(verified.to_json())
        except ValueError as exc:
            raise _classify(exc) from exc
        report = result.get("report")
        if not isinstance(report, dict) or len(report) != 1:
            raise EvidenceError("dcap-qvl returned no report")
        ((kind, body),) = report.items()
        common: dict[str, Any] = {
            "evidence_type": actual,
            "simulated": False,
            "evidence_digest": hashlib.sha256(data).hexdigest(),
            "tcb_status": normalise_tcb_status(str(result.get("status", ""))),
            "advisory_ids": tuple(str(item) for item in result.get("advisory_ids") or ()),
            "verified_at": now,
            "collateral_issued_at": collateral.issued_at,
            "collateral_next_update": collateral.next_update,
            "fmspc": fmspc.lower(),
        }
        if kind == "SgxEnclave" and not is_tdx:
            attributes = bytes.fromhex(body["attributes"])
            return Claims(
                tee="sgx",
                debug=bool(attributes[0] & _SGX_DEBUG),
                report_data=bytes.fromhex(body["report_data"]),
                mrenclave=body["mr_enclave"],
                mrsigner=body["mr_signer"],
                isv_prod_id=int(body["isv_prod_id"]),
                isv_svn=int(body["isv_svn"]),
                attributes=body["attributes"],
                **common,
            )
        if kind != "SgxEnclave" and is_tdx:
            td = _td_report(body)
            td_attributes = bytes.fromhex(td["td_attributes"])
            return Claims(
                tee="tdx",
                # Any TUD bit (bits 7:0) set means the TD is under debug and untrusted.
                debug=td_attributes[0] != 0,
                report_data=bytes.fromhex(td["report_data"]),
                mrtd=td["mr_td"],
                rtmr0=td["rt_mr0"],
                rtmr1=td["rt_mr1"],
                rtmr2=td["rt_mr2"],
                rtmr3=td["rt_mr3"],
                td_attributes=td["td_attributes"],
                mrconfigid=td["mr_config_id"],
                mrowner=td["mr_owner"],
                mrownerconfig=td["mr_owner_config"],
                mrseam=td["mr_seam"],
                xfam=td["xfam"],
                **common,
            )
        raise EvidenceError(f"unexpected report kind {kind!r} for a {actual} quote")
