"""The ``snp`` verifier: AMD SEV-SNP attestation reports, checked against AMD's pinned roots.

For each report it checks, in order: the report's structure (:func:`parse_report`); the
endorsement key — the VCEK or VLEK the host sent in the certificate table, else the VCEK for
this chip and TCB from the offline cache; that the key's certificate chains to the product's
ASK and to the ARK pinned by fingerprint (:data:`AMD_ROOTS`), all valid at ``now``; that the
product's CRL is signed by that ARK, current, and revokes neither the ASK nor the key; that the
VCEK was issued for this chip (hwID) and for exactly the report's ``reported_tcb``; and the
report's ECDSA P-384 signature. Chain results are cached per endorsement certificate and
collateral version, so a repeated check costs one signature verification.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from sealtorch._crypto import amdsev
from sealtorch.attestation.claims import Claims
from sealtorch.attestation.collateral import _aware
from sealtorch.attestation.evidence import Evidence, EvidenceType
from sealtorch.attestation.snp_collateral import (
    AMD_ROOTS,
    ChainFiles,
    ChainKind,
    SnpCollateralDirectory,
    TrustedArks,
)
from sealtorch.attestation.snp_report import (
    GUID_VCEK,
    GUID_VLEK,
    SnpReport,
    TcbVersion,
    parse_cert_table,
    parse_report,
    split_evidence,
)
from sealtorch.attestation.snp_roots import PRODUCTS, Product
from sealtorch.attestation.verifier import UnsupportedEvidenceError
from sealtorch.errors import CollateralError, EvidenceError

__all__ = ["SnpVerifier"]

# AMD's VCEK extensions (VCEK spec 57230, Table 8).
_OID_PRODUCT_NAME: Final = "1.3.6.1.4.1.3704.1.2"
_OID_HWID: Final = "1.3.6.1.4.1.3704.1.4"
_OID_SPL: Final[dict[str, str]] = {
    "bootloader": "1.3.6.1.4.1.3704.1.3.1",
    "tee": "1.3.6.1.4.1.3704.1.3.2",
    "snp": "1.3.6.1.4.1.3704.1.3.3",
    "microcode": "1.3.6.1.4.1.3704.1.3.8",
    "fmc": "1.3.6.1.4.1.3704.1.3.9",
}
_ISSUER = re.compile(r"SEV-(?:VLEK-)?(Milan|Genoa|Turin)")
# CPUID family of each product (reports v3+ carry it): Milan and Genoa are family 19h.
_FAMILY: Final[dict[Product, int]] = {"Milan": 0x19, "Genoa": 0x19, "Turin": 0x1A}
_CACHE_LIMIT: Final = 4096


def _der_int(raw: bytes | None, what: str) -> int | None:
    """A small DER INTEGER (what AMD puts in the SPL extensions)."""
    if raw is None:
        return None
    if len(raw) < 3 or raw[0] != 0x02 or raw[1] != len(raw) - 2 or raw[1] > 8:
        raise EvidenceError(f"the VCEK's {what} extension is not a DER integer")
    return int.from_bytes(raw[2:], "big", signed=True)


@dataclass(frozen=True, slots=True)
class _Endorsement:
    """A VCEK/VLEK whose chain verified, with what it certifies, valid from start to end."""

    product: Product
    cert: amdsev.Certificate
    chain: ChainFiles
    start: datetime
    end: datetime
    spl: dict[str, int | None]
    hwid: bytes | None


class SnpVerifier:
    """Verifies ``sev-snp`` evidence with collateral from an offline cache.

    ``allow_missing_crl_insecure`` accepts a cache without the product's CRL (then nothing is
    known about revoked ASKs): for checking evidence by hand only, never in a service.
    ``roots`` is :data:`AMD_ROOTS` except in sealtorch's own tests.
    """

    evidence_types: frozenset[EvidenceType] = frozenset({"sev-snp"})

    def __init__(
        self,
        *,
        collateral: SnpCollateralDirectory,
        roots: TrustedArks = AMD_ROOTS,
        allow_missing_crl_insecure: bool = False,
    ) -> None:
        self.collateral = collateral
        self.roots = roots
        self.allow_missing_crl_insecure = allow_missing_crl_insecure
        self._lock = threading.Lock()
        # (SHA-256 of the endorsement certificate, kind) -> its verified chain and facts
        self._verified: dict[tuple[bytes, ChainKind], _Endorsement] = {}

    def __repr__(self) -> str:
        return f"SnpVerifier(collateral={self.collateral!r})"

    def verify(self, evidence: Evidence, *, now: datetime) -> Claims:
        now = _aware(now)
        if evidence.type not in self.evidence_types:
            raise UnsupportedEvidenceError(
                evidence.type, f"the snp verifier does not verify {evidence.type!r} evidence"
            )
        raw_report, table = split_evidence(evidence.data)
        report = parse_report(raw_report)
        certs = parse_cert_table(table)
        kind: ChainKind = report.signing_key
        endorsement = certs.get(GUID_VLEK if kind == "vlek" else GUID_VCEK)
        if endorsement is None:
            if kind == "vlek":
                raise EvidenceError(
                    "the report is signed by a VLEK but the host sent no VLEK certificate"
                )
            if report.mask_chip_key:
                raise EvidenceError(
                    "the report masks its chip id and the host sent no VCEK: it cannot be verified"
                )
            endorsement = self.collateral.vcek(report.chip_id, report.reported_tcb)
            if endorsement is None:
                raise CollateralError(
                    f"no VCEK for chip {report.chip_id.hex()[:16]}... at TCB "
                    f"{report.reported_tcb.hex()} in {self.collateral.root} and none came with "
                    "the report (run `sealtorch attest fetch-collateral` with this evidence)"
                )
        known = self._endorsement(endorsement, kind, now)
        product, cert, chain = known.product, known.cert, known.chain
        if report.cpuid is not None and report.cpuid[0] not in (0, _FAMILY[product]):
            raise EvidenceError(
                f"the report's CPU family 0x{report.cpuid[0]:x} is not a {product} processor"
            )
        tcb = TcbVersion.decode(report.reported_tcb, turin=product == "Turin")
        self._check_endorsement_binding(known, kind, report, tcb)
        r, s = report.signature
        try:
            amdsev.check_p384_signature(cert, report.signed_bytes, r, s)
        except ValueError as exc:
            raise EvidenceError(
                f"the SNP report's signature does not verify with the {kind.upper()}: {exc}"
            ) from exc
        issued, next_update = (None, None)
        if chain.crl is not None:
            issued, next_update = amdsev.crl_window(chain.crl)
        return self._claims(report, evidence, product, kind, tcb, now, issued, next_update)

    # -- the endorsement key's chain ----------------------------------------------------------

    def _endorsement(self, der: bytes, kind: ChainKind, now: datetime) -> _Endorsement:
        digest = hashlib.sha256(der).digest()
        with self._lock:
            known = self._verified.get((digest, kind))
        if known is not None:
            chain = self._chain(known.product, kind)
            if chain.stamp != known.chain.stamp:
                known = None
        if known is None:
            known = self._verify_endorsement(der, kind)
            with self._lock:
                if len(self._verified) >= _CACHE_LIMIT:
                    self._verified.clear()
                self._verified[(digest, kind)] = known
        if not known.start <= now <= known.end:
            stale = known.chain.crl is not None and now > known.end and now > known.start
            raise CollateralError(
                f"the {known.product} SNP certificate chain or CRL is not valid at "
                f"{now.isoformat()} (valid {known.start.isoformat()} to {known.end.isoformat()})",
                stale=stale,
            )
        return known

    def _chain(self, product: Product, kind: ChainKind) -> ChainFiles:
        chain = self.collateral.chain(product, kind)
        if chain.crl is None and not self.allow_missing_crl_insecure:
            raise CollateralError(
                f"no CRL for {product} in {self.collateral.root / product} (AMD KDS "
                f"/{kind}/v1/{product}/crl); revocation cannot be checked"
            )
        return chain

    def _verify_endorsement(self, der: bytes, kind: ChainKind) -> _Endorsement:
        try:
            cert = amdsev.load_certificate(der)
        except ValueError as exc:
            raise EvidenceError(f"the {kind.upper()} certificate is unreadable: {exc}") from exc
        match = _ISSUER.fullmatch(amdsev.cn_of(cert.issuer))
        if match is None:
            raise EvidenceError(
                f"the {kind.upper()} is issued by {amdsev.cn_of(cert.issuer)!r}, not by an AMD "
                f"signing key for {', '.join(PRODUCTS)}"
            )
        product: Product = next(p for p in PRODUCTS if p == match.group(1))
        chain = self._chain(product, kind)
        try:
            self.roots.pinned(product, chain.ark)
            amdsev.check_issued_by(chain.ark, chain.ark)
            amdsev.check_issued_by(chain.ask, chain.ark)
            amdsev.check_issued_by(cert, chain.ask)
        except ValueError as exc:
            raise EvidenceError(f"the {kind.upper()} does not chain to AMD: {exc}") from exc
        windows = [amdsev.validity(item) for item in (chain.ark, chain.ask, cert)]
        start = max(window[0] for window in windows)
        end = min(window[1] for window in windows)
        if chain.crl is not None:
            try:
                revoked = amdsev.crl_revokes(
                    chain.crl, chain.ark, [chain.ask.serial_number, cert.serial_number]
                )
            except ValueError as exc:
                raise CollateralError(f"the {product} CRL does not verify: {exc}") from exc
            if revoked:
                raise EvidenceError(
                    f"AMD's {product} CRL revokes the "
                    + ("ASK" if chain.ask.serial_number in revoked else kind.upper())
                    + " that endorses this report"
                )
            this_update, next_update = amdsev.crl_window(chain.crl)
            if next_update is None:
                raise CollateralError(
                    f"the {product} CRL has no nextUpdate: its freshness cannot be judged"
                )
            start, end = max(start, this_update), min(end, next_update)
        try:
            spl = {
                name: _der_int(amdsev.extension_bytes(cert, oid), name)
                for name, oid in _OID_SPL.items()
            }
            hwid = amdsev.extension_bytes(cert, _OID_HWID)
        except ValueError as exc:
            raise EvidenceError(
                f"the {kind.upper()}'s AMD extensions are unreadable: {exc}"
            ) from exc
        return _Endorsement(
            product=product, cert=cert, chain=chain, start=start, end=end, spl=spl, hwid=hwid
        )

    @staticmethod
    def _check_endorsement_binding(
        endorsement: _Endorsement, kind: ChainKind, report: SnpReport, tcb: TcbVersion
    ) -> None:
        for name, value in tcb.components().items():
            certified = endorsement.spl[name]
            if certified is None and kind == "vcek":
                raise EvidenceError(f"the VCEK has no {name} TCB extension")
            if certified is not None and certified != value:
                raise EvidenceError(
                    f"the {kind.upper()} was issued for {name} SPL {certified}, but the "
                    f"report's reported_tcb says {value}: it is not this TCB's key"
                )
        if kind == "vcek" and not report.mask_chip_key:
            turin = endorsement.product == "Turin"
            expected = report.chip_id[:8] if turin else report.chip_id
            if endorsement.hwid != expected:
                raise EvidenceError(
                    "the VCEK belongs to another chip (its hwID is not the report's chip_id)"
                )

    @staticmethod
    def _claims(
        report: SnpReport,
        evidence: Evidence,
        product: Product,
        kind: ChainKind,
        tcb: TcbVersion,
        now: datetime,
        issued: datetime | None,
        next_update: datetime | None,
    ) -> Claims:
        return Claims(
            tee="snp",
            evidence_type="sev-snp",
            simulated=False,
            debug=report.debug,
            report_data=report.report_data,
            evidence_digest=evidence.digest,
            tcb_status="NotApplicable",
            verified_at=now,
            collateral_issued_at=issued,
            collateral_next_update=next_update,
            snp_product=product,
            snp_signing_key=kind,
            launch_measurement=report.measurement.hex(),
            host_data=report.host_data.hex(),
            family_id=report.family_id.hex(),
            image_id=report.image_id.hex(),
            id_key_digest=report.id_key_digest.hex(),
            author_key_digest=report.author_key_digest.hex(),
            author_key_enabled=report.author_key_en,
            chip_id=report.chip_id.hex(),
            reported_tcb=report.reported_tcb.hex(),
            guest_svn=report.guest_svn,
            vmpl=report.vmpl,
            guest_policy=report.policy,
            platform_info=report.platform_info,
            tcb_bootloader=tcb.bootloader,
            tcb_tee=tcb.tee,
            tcb_snp=tcb.snp,
            tcb_microcode=tcb.microcode,
            tcb_fmc=tcb.fmc,
        )
