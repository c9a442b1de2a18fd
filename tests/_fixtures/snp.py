"""A test AMD: an ARK → ASK → VCEK hierarchy made here, and SNP reports signed by the test VCEK.

Shaped like AMD's (RSA-PSS ARK/ASK with AMD's names, an ECDSA P-384 VCEK with AMD's TCB and
hwID extensions, a CRL signed by the ARK). A verifier trusts it only through
``TrustedArks.test_roots_insecure`` — the explicit test-only seam; production pins are AMD's.
Also the fake kernels: configfs-tsm (``FakeSnpTsm``) and ``/dev/sev-guest`` (``FakeSevGuest``).
"""

from __future__ import annotations

import ctypes
import errno
import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from sealtorch.attestation import SnpAttester, TrustedArks
from sealtorch.attestation.snp_report import (
    GUID_VCEK,
    GUID_VLEK,
    REPORT_SIZE,
    SIGNED_SIZE,
    build_cert_table,
)
from sealtorch.attestation.snp_roots import Product

NOT_BEFORE = datetime(2024, 1, 1, tzinfo=UTC)
NOT_AFTER = datetime(2034, 1, 1, tzinfo=UTC)
#: The CRL of the test hierarchy is current from NOT_BEFORE for 30 days: verify at NOW.
NOW = datetime(2024, 1, 10, tzinfo=UTC)
MEASUREMENT = bytes(range(48))
HOST_DATA = bytes([0xAB]) * 32
DEFAULT_TCB = bytes([3, 0, 0, 0, 0, 0, 8, 0x73])  # Milan: bl 3, tee 0, snp 8, ucode 115
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Advanced Micro Devices"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _der_int(value: int) -> bytes:
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")
    return bytes([0x02, len(body)]) + body


def _cert(
    subject: str, issuer: str, public: object, signer: object, *, ca: bool, serial: int
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(public)  # type: ignore[arg-type]
        .serial_number(serial)
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    return builder.sign(signer, hashes.SHA384(), rsa_padding=_PSS)  # type: ignore[arg-type]


@dataclass
class FakeAmd:
    """One product's test root, signing key, and one chip's VCEK at one TCB."""

    product: Product = "Milan"
    chip_id: bytes = bytes(range(64))
    tcb: bytes = DEFAULT_TCB
    ark_key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    ask_key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    vcek_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP384R1())
    )

    def __post_init__(self) -> None:
        ark_cn, ask_cn = f"ARK-{self.product}", f"SEV-{self.product}"
        self.ark = _cert(ark_cn, ark_cn, self.ark_key.public_key(), self.ark_key, ca=True, serial=1)
        self.ask = _cert(ask_cn, ark_cn, self.ask_key.public_key(), self.ark_key, ca=True, serial=2)
        self.vcek = self.make_vcek()

    def make_vcek(
        self,
        *,
        chip_id: bytes | None = None,
        tcb: bytes | None = None,
        key: ec.EllipticCurvePrivateKey | None = None,
        issuer_key: rsa.RSAPrivateKey | None = None,
    ) -> x509.Certificate:
        """A VCEK for a chip and TCB (by default this one's), signed by the ASK."""
        chip = chip_id if chip_id is not None else self.chip_id
        raw = tcb if tcb is not None else self.tcb
        if self.product == "Turin":
            spl = {"9": raw[0], "1": raw[1], "2": raw[2], "3": raw[3], "8": raw[7]}
            hwid = chip[:8]
        else:
            spl = {"1": raw[0], "2": raw[1], "3": raw[6], "8": raw[7]}
            hwid = chip
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name("SEV-VCEK"))
            .issuer_name(_name(f"SEV-{self.product}"))
            .public_key((key or self.vcek_key).public_key())
            .serial_number(3)
            .not_valid_before(NOT_BEFORE)
            .not_valid_after(NOT_AFTER)
            .add_extension(
                x509.UnrecognizedExtension(
                    x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.2"),
                    b"\x16" + bytes([len(self.product) + 3]) + f"{self.product}-B0".encode(),
                ),
                critical=False,
            )
            .add_extension(
                x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.4"), hwid),
                critical=False,
            )
        )
        for arc, value in spl.items():
            builder = builder.add_extension(
                x509.UnrecognizedExtension(
                    x509.ObjectIdentifier(f"1.3.6.1.4.1.3704.1.3.{arc}"), _der_int(value)
                ),
                critical=False,
            )
        return builder.sign(issuer_key or self.ask_key, hashes.SHA384(), rsa_padding=_PSS)

    @property
    def roots(self) -> TrustedArks:
        from sealtorch._crypto.amdsev import cert_fingerprint

        return TrustedArks.test_roots_insecure({self.product: cert_fingerprint(self.ark)})

    def crl(
        self,
        *,
        revoked: tuple[int, ...] = (),
        this_update: datetime = NOT_BEFORE,
        next_update: datetime | None = None,
        signer: rsa.RSAPrivateKey | None = None,
    ) -> bytes:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.ark.subject)
            .last_update(this_update)
            .next_update(next_update or this_update + timedelta(days=30))
        )
        for serial in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(this_update)
                .build()
            )
        crl = builder.sign(signer or self.ark_key, hashes.SHA384(), rsa_padding=_PSS)
        return crl.public_bytes(serialization.Encoding.DER)

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (self.ask, self.ark))

    def write_cache(self, root: Path, *, crl: bytes | None = None, vcek: bool = False) -> Path:
        """Fill an SNP collateral cache (``root`` is the ``snp/`` folder)."""
        folder = root / self.product
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "cert_chain.pem").write_bytes(self.chain_pem())
        (folder / "crl.der").write_bytes(crl if crl is not None else self.crl())
        if vcek:
            (folder / "vcek").mkdir(exist_ok=True)
            name = f"{self.chip_id.hex()}-{self.tcb.hex()}.der"
            (folder / "vcek" / name).write_bytes(self.vcek.public_bytes(serialization.Encoding.DER))
        return root

    def report(
        self,
        report_data: bytes,
        *,
        version: int = 2,
        guest_svn: int = 1,
        policy: int = 0x30000,
        vmpl: int = 0,
        platform_info: int = 0,
        measurement: bytes = MEASUREMENT,
        host_data: bytes = HOST_DATA,
        signing_key: int = 0,
        author_key_en: bool = False,
        tcb: bytes | None = None,
        chip_id: bytes | None = None,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> bytes:
        raw = bytearray(REPORT_SIZE)
        tcb = tcb if tcb is not None else self.tcb
        struct.pack_into("<IIQ", raw, 0, version, guest_svn, policy)
        struct.pack_into("<II", raw, 0x30, vmpl, 1)
        raw[0x38:0x40] = tcb
        struct.pack_into("<QI", raw, 0x40, platform_info, (signing_key << 2) | int(author_key_en))
        raw[0x50:0x90] = report_data
        raw[0x90:0xC0] = measurement
        raw[0xC0:0xE0] = host_data
        raw[0x180:0x188] = tcb
        if version >= 3:
            raw[0x188] = 0x1A if self.product == "Turin" else 0x19
        raw[0x1A0:0x1E0] = chip_id if chip_id is not None else self.chip_id
        raw[0x1E0:0x1E8] = tcb
        raw[0x1F0:0x1F8] = tcb
        der = (key or self.vcek_key).sign(bytes(raw[:SIGNED_SIZE]), ec.ECDSA(hashes.SHA384()))
        r, s = decode_dss_signature(der)
        raw[0x2A0 : 0x2A0 + 72] = r.to_bytes(72, "little")
        raw[0x2E8 : 0x2E8 + 72] = s.to_bytes(72, "little")
        return bytes(raw)

    def cert_table(self, vcek: x509.Certificate | None = None, *, vlek: bool = False) -> bytes:
        der = (vcek or self.vcek).public_bytes(serialization.Encoding.DER)
        return build_cert_table({GUID_VLEK if vlek else GUID_VCEK: der})

    def evidence(self, report_data: bytes, **options: object) -> bytes:
        """A report with the VCEK in its certificate table (what a guest sends)."""
        return self.report(report_data, **options) + self.cert_table()  # type: ignore[arg-type]


class FakeSnpTsm(SnpAttester):
    """What the kernel's configfs-tsm does for an SEV-SNP guest, over a plain directory."""

    def __init__(self, root: Path, amd: FakeAmd, *, provider: str = "sev_guest", aux: bool = True):
        super().__init__(root=root, device=root / "no-device")
        self.amd, self.provider, self.aux = amd, provider, aux

    def create_entry(self, entry: Path) -> None:
        super().create_entry(entry)
        (entry / "provider").write_text(self.provider + "\n")
        (entry / "generation").write_text("0\n")

    def read_attribute(self, path: Path, limit: int) -> bytes:
        if path.name == "outblob":
            return self.amd.report((path.parent / "inblob").read_bytes())
        return super().read_attribute(path, limit)

    def read_aux(self, path: Path) -> bytes:
        return self.amd.cert_table() if self.aux else b""

    def remove_entry(self, entry: Path) -> None:
        for child in entry.iterdir():
            child.unlink()
        super().remove_entry(entry)


class FakeSevGuest(SnpAttester):
    """The sev-guest driver's SNP_GET_EXT_REPORT, answered from the test AMD.

    Reads the request through the pointers, as the kernel does, and writes the response and
    the certificate table back; asks for a larger buffer first when ``need_pages`` says so.
    """

    def __init__(self, device: Path, amd: FakeAmd, *, need_pages: int = 0, status: int = 0):
        super().__init__(root=device.parent / "no-configfs", device=device)
        self.amd, self.need_pages, self.status = amd, need_pages, status
        self.calls = 0

    def _ioctl(self, fd: int, request: int, arg: bytearray) -> None:
        self.calls += 1
        _version, req_addr, resp_addr, _ = struct.unpack("<B7xQQQ", arg)
        req = ctypes.string_at(req_addr, 112)
        data, _vmpl, certs_addr, certs_len = struct.unpack_from("<64sI28xQI", req)
        if self.need_pages and certs_len < self.need_pages * 4096:
            ctypes.memmove(req_addr + 104, struct.pack("<I", self.need_pages * 4096), 4)
            struct.pack_into("<Q", arg, 24, 1 << 32)
            raise OSError(errno.EIO, "certificate buffer too small")
        table = self.amd.cert_table()
        ctypes.memmove(certs_addr, table, len(table))
        report = self.amd.report(data)
        header = struct.pack("<II24x", self.status, len(report))
        ctypes.memmove(resp_addr, header + report, len(header) + len(report))
