"""SEV-SNP collateral: the pinned AMD roots, an offline cache the operator fills, and AMD KDS.

The SNP verifier needs, per product (Milan, Genoa, Turin): AMD's ASK and ARK (the
``cert_chain``), AMD's CRL for the product (signed by the ARK; it revokes ASKs), and the VCEK
of the chip at the report's TCB unless the host sends it with the report. The cache is a plain
directory, the ``snp/`` folder of the collateral directory (or of the PCCS collateral cache)::

    snp/Milan/cert_chain.pem          ASK then ARK        (KDS /vcek/v1/Milan/cert_chain)
    snp/Milan/crl.der                 the product's CRL   (KDS /vcek/v1/Milan/crl)
    snp/Milan/vlek_cert_chain.pem     ASVK then ARK, for VLEK-signed reports (optional)
    snp/Milan/vlek_crl.der            the VLEK CRL        (KDS /vlek/v1/Milan/crl; optional)
    snp/Milan/vcek/<chip id hex>-<reported_tcb hex>.der   VCEKs (KDS /vcek/v1/Milan/<hwid>?...)

:func:`fetch_from_kds` fills it (``sealtorch attest fetch-collateral``); nothing on the
verification path touches the network. Which root is trusted is not part of the collateral: a
chain counts only if its ARK has the fingerprint pinned in :data:`AMD_ROOTS`.
"""

from __future__ import annotations

import os
import tempfile
import threading
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from sealtorch._crypto import amdsev
from sealtorch.attestation.snp_report import SnpReport, TcbVersion
from sealtorch.attestation.snp_roots import AMD_ARK_SHA256, PRODUCTS, Product
from sealtorch.errors import CollateralError, ConfigError

__all__ = [
    "AMD_KDS_URL",
    "AMD_ROOTS",
    "ChainKind",
    "SnpCollateralDirectory",
    "TrustedArks",
    "fetch_from_kds",
    "parse_product",
    "vcek_filename",
]

AMD_KDS_URL: Final = "https://kdsintf.amd.com"
ChainKind = Literal["vcek", "vlek"]
_CHAIN_FILE: Final[dict[ChainKind, str]] = {"vcek": "cert_chain.pem", "vlek": "vlek_cert_chain.pem"}
_CRL_FILE: Final[dict[ChainKind, str]] = {"vcek": "crl.der", "vlek": "vlek_crl.der"}
_MAX_FILE: Final = 256 * 1024


def parse_product(name: str) -> Product:
    for product in PRODUCTS:
        if name.strip().lower() == product.lower():
            return product
    raise ConfigError(f"unknown SNP product {name!r}; choose one of {', '.join(PRODUCTS)}")


@dataclass(frozen=True, slots=True)
class TrustedArks:
    """Which ARK (by SHA-256 of its DER encoding) is the root for each product."""

    sha256: Mapping[Product, str]

    @classmethod
    def test_roots_insecure(cls, sha256: Mapping[Product, str]) -> TrustedArks:
        """FOR TESTS ONLY: trust other roots than AMD's (a test ARK signing a test VCEK).

        Nothing in sealtorch's command line or configuration reaches this; a verifier built
        with it accepts reports that no AMD processor signed.
        """
        return cls(sha256=dict(sha256))

    def pinned(self, product: Product, ark: amdsev.Certificate) -> None:
        expected = self.sha256.get(product)
        actual = amdsev.cert_fingerprint(ark)
        if expected is None or actual != expected:
            raise ValueError(
                f"the certificate chain does not end at AMD's ARK for {product} (root "
                f"{amdsev.cn_of(ark.subject)!r}, SHA-256 {actual}, expected {expected})"
            )


#: AMD's roots: the production pins (see ``snp_roots``).
AMD_ROOTS: Final = TrustedArks(sha256=AMD_ARK_SHA256)


def vcek_filename(chip_id: bytes, reported_tcb: bytes) -> str:
    return f"{chip_id.hex()}-{reported_tcb.hex()}.der"


@dataclass(frozen=True, slots=True)
class ChainFiles:
    """One product's chain and CRL as found in the cache, with a stamp to notice changes."""

    ask: amdsev.Certificate
    ark: amdsev.Certificate
    crl: amdsev.Crl | None
    stamp: tuple[int, ...]


class SnpCollateralDirectory:
    """The offline SNP collateral cache (read side). Files are re-read when they change."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()
        self._chains: dict[tuple[Product, ChainKind], ChainFiles] = {}
        self._vceks: dict[str, tuple[Path, tuple[int, ...], bytes]] = {}
        self._paths = {
            (product, kind): (
                self.root / product / _CHAIN_FILE[kind],
                self.root / product / _CRL_FILE[kind],
            )
            for product in PRODUCTS
            for kind in ("vcek", "vlek")
        }

    def __repr__(self) -> str:
        return f"SnpCollateralDirectory({str(self.root)!r})"

    def _read(self, path: Path) -> bytes:
        try:
            with open(path, "rb") as handle:
                data = handle.read(_MAX_FILE + 1)
        except OSError as exc:
            raise CollateralError(f"cannot read SNP collateral {path}: {exc.strerror}") from exc
        if len(data) > _MAX_FILE:
            raise CollateralError(f"SNP collateral {path} is too large")
        return data

    @staticmethod
    def _stamp(*paths: Path) -> tuple[int, ...]:
        stamp: list[int] = []
        for path in paths:
            try:
                info = path.stat()
                stamp += [info.st_mtime_ns, info.st_size, info.st_ino]
            except FileNotFoundError:
                stamp += [-1, -1, -1]
        return tuple(stamp)

    def chain(self, product: Product, kind: ChainKind = "vcek") -> ChainFiles:
        """The product's (ASK or ASVK, ARK, CRL or None); CollateralError when missing."""
        folder = self.root / product
        chain_path, crl_path = self._paths[(product, kind)]
        stamp = self._stamp(chain_path, crl_path)
        with self._lock:
            cached = self._chains.get((product, kind))
        if cached is not None and cached.stamp == stamp:
            return cached
        if not chain_path.is_file():
            raise CollateralError(
                f"no SNP certificate chain for {product} in {folder} (run `sealtorch attest "
                "fetch-collateral` with SNP evidence, or copy AMD's cert_chain there)"
            )
        try:
            certs = amdsev.load_certificates_pem(self._read(chain_path))
            crl = amdsev.load_crl(self._read(crl_path)) if crl_path.is_file() else None
        except ValueError as exc:
            raise CollateralError(f"SNP collateral for {product} is unreadable: {exc}") from exc
        if len(certs) != 2:
            raise CollateralError(
                f"{chain_path} must hold exactly two certificates (ASK then ARK), not {len(certs)}"
            )
        loaded = ChainFiles(ask=certs[0], ark=certs[1], crl=crl, stamp=stamp)
        with self._lock:
            self._chains[(product, kind)] = loaded
        return loaded

    def vcek(self, chip_id: bytes, reported_tcb: bytes) -> bytes | None:
        """A cached VCEK for this chip at this TCB (any product), or ``None``."""
        name = vcek_filename(chip_id, reported_tcb)
        with self._lock:
            known = self._vceks.get(name)
        if known is not None and self._stamp(known[0]) == known[1]:
            return known[2]
        for product in PRODUCTS:
            path = self.root / product / "vcek" / name
            if path.is_file():
                stamp, data = self._stamp(path), self._read(path)
                with self._lock:
                    if len(self._vceks) >= 4096:
                        self._vceks.clear()
                    self._vceks[name] = (path, stamp, data)
                return data
        return None


# -- AMD KDS --------------------------------------------------------------------------------------


def _get(client: object, url: str, base_url: str) -> bytes:
    import httpx

    assert isinstance(client, httpx.Client)  # noqa: S101 - internal
    try:
        response = client.get(url)
    except httpx.HTTPError as exc:
        reason = str(exc) or type(exc).__name__
        raise CollateralError(
            f"cannot reach AMD KDS at {base_url} ({reason.splitlines()[0]}); fetch the "
            "collateral on a machine with network access and copy its snp/ folder here"
        ) from exc
    if response.status_code != 200:
        hint = " (KDS limits request rates: wait and retry)" if response.status_code == 429 else ""
        raise CollateralError(f"AMD KDS answered HTTP {response.status_code} for {url}{hint}")
    if len(response.content) > _MAX_FILE:
        raise CollateralError(f"AMD KDS sent more than {_MAX_FILE} bytes for {url}")
    return response.content


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        Path(temp).replace(path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def vcek_query(product: Product, report: SnpReport) -> str:
    """The KDS path of the VCEK that signed ``report``: hwid and the reported TCB's SPLs."""
    turin = product == "Turin"
    tcb = TcbVersion.decode(report.reported_tcb, turin=turin)
    hwid = report.chip_id[:8] if turin else report.chip_id
    params = {
        "blSPL": tcb.bootloader,
        "teeSPL": tcb.tee,
        "snpSPL": tcb.snp,
        "ucodeSPL": tcb.microcode,
    }
    if tcb.fmc is not None:
        params["fmcSPL"] = tcb.fmc
    return f"/vcek/v1/{product}/{hwid.hex()}?{urllib.parse.urlencode(params)}"


def fetch_from_kds(
    root: str | os.PathLike[str],
    *,
    product: Product,
    report: SnpReport | None = None,
    kind: ChainKind = "vcek",
    base_url: str = AMD_KDS_URL,
    roots: TrustedArks = AMD_ROOTS,
    timeout: float = 15.0,
    transport: object | None = None,
) -> list[Path]:
    """Fetch ``product``'s chain and CRL (and ``report``'s VCEK) from AMD KDS into ``root``.

    Everything is checked before anything is written: the ARK must be the pinned one, the ASK
    and the CRL signed by it, the VCEK signed by the ASK. Returns the files written. Raises
    :class:`~sealtorch.errors.CollateralError` (one line) when KDS cannot be reached or answers
    anything else.
    """
    import httpx

    if report is not None and report.mask_chip_key:
        raise CollateralError("the report masks its chip id: its VCEK cannot be fetched")
    base = base_url.rstrip("/")
    folder = Path(root) / product
    client = httpx.Client(
        base_url=base,
        timeout=timeout,
        follow_redirects=False,
        transport=transport,  # type: ignore[arg-type]
    )
    with client:
        chain_pem = _get(client, f"/{kind}/v1/{product}/cert_chain", base)
        crl_der = _get(client, f"/{kind}/v1/{product}/crl", base)
        vcek_der = _get(client, vcek_query(product, report), base) if report else None
    try:
        certs = amdsev.load_certificates_pem(chain_pem)
        if len(certs) != 2:
            raise ValueError(f"the chain has {len(certs)} certificates, not 2 (ASK, ARK)")
        ask, ark = certs
        roots.pinned(product, ark)
        amdsev.check_issued_by(ark, ark)
        amdsev.check_issued_by(ask, ark)
        amdsev.crl_revokes(amdsev.load_crl(crl_der), ark, [])
        if vcek_der is not None:
            amdsev.check_issued_by(amdsev.load_certificate(vcek_der), ask)
    except ValueError as exc:
        raise CollateralError(f"AMD KDS sent collateral that does not verify: {exc}") from exc
    written = [folder / _CHAIN_FILE[kind], folder / _CRL_FILE[kind]]
    _write(written[0], chain_pem)
    _write(written[1], crl_der)
    if vcek_der is not None and report is not None:
        written.append(folder / "vcek" / vcek_filename(report.chip_id, report.reported_tcb))
        _write(written[-1], vcek_der)
    return written
