"""Facts about the real samples in tests/data/attestation (from their README.md)."""

from __future__ import annotations

from datetime import UTC, datetime

#: When each sample's collateral was valid.
SGX_TIME = datetime.fromtimestamp(1750334171, UTC)
TDX_TIME = datetime.fromtimestamp(1750331763, UTC)
#: The samples' collateral expires (earliest nextUpdate) at these times.
SGX_COLLATERAL_EXPIRY = datetime(2025, 7, 19, 10, 1, 18, tzinfo=UTC)
TDX_COLLATERAL_EXPIRY = datetime(2025, 7, 19, 10, 0, 35, tzinfo=UTC)

SGX_MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
SGX_MRSIGNER = "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"
SGX_REPORT_DATA = b"Hello, world!".ljust(64, b"\0")
SGX_FMSPC = "00A067110000"
SGX_ADVISORIES = ("INTEL-SA-00289", "INTEL-SA-00615")

TDX_MRTD = (
    "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407"
    "de03ae6dc5f87f27428b2538873118b7"
)
TDX_RTMR0 = (
    "44c0197b39157fdd7a4dcc44767f9d6b0bb3977c7a8e347b8492f827fe9d9e5c"
    "48aca29b220b80b6a540cf994b9bc9c0"
)
TDX_RTMR3 = "00" * 48
TDX_FMSPC = "B0C06F000000"
TDX_REPORT_DATA = bytes.fromhex(
    "9a9d48e7f6799642d3d1b34e1e5e1742d4bb02dd6ddd551862c1211d35c304f9"
    "eca3efdbb481601c163cf52493d6e44aed55d51ec39b7e518fadb92c2b523f20"
)

# The real AMD SEV-SNP Milan report in tests/data/attestation/snp (facts from its README.md).
SNP_TIME = datetime(2024, 6, 1, tzinfo=UTC)  # inside the VCEK's validity (2023-04-03..2030-04-03)
SNP_MEASUREMENT = (
    "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b5"
    "79ea158d3e1a0dc39b2c60bd95b9c480cd81841f"
)
SNP_REPORT_DATA = bytes.fromhex(
    "d447b55d197491bfe15cf298f9de9986b7a7c4be2468b4f6e2d53b71d7c64581"
    "0b0f2cdfca0040433be063fc1a8293f0f3f8dae7b79fecb3d1cd82bd6a93ebfd"
)
SNP_REPORTED_TCB = "0300000000000873"  # boot loader 3, TEE 0, SNP 8, microcode 115
SNP_MILAN_ARK_SHA256 = "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd"
