"""Evidence providers for real TEEs — Gramine-SGX and TDX (configfs-tsm) — and a factory.
* SEV-SNP: configfs-tsm as for TDX (provider ``sev_guest``; ``auxblob`` holds the host's
  certificate table with the VCEK or VLEK when the host supplies it), or, where configfs-tsm is
  absent, the ``SNP_GET_EXT_REPORT`` ioctl on ``/dev/sev-guest``.

Both read and write files under a configurable root, so they can be tested against a fake
directory laid out like the real one:

* Gramine (``/dev/attestation``): ``attestation_type`` must read ``dcap``; write the 64 bytes to
  ``user_report_data``; read the DCAP quote from ``quote``.
* TDX (``/sys/kernel/config/tsm/report``, Linux ≥ 6.7): create an entry directory (the kernel
  populates it), check ``provider`` (``tdx_guest``), write ``inblob``, read ``outblob`` while
  ``generation`` stays unchanged (else another writer raced us: retry), remove the entry.

Each provider checks that the quote it returns carries exactly the requested report_data.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import secrets
import struct
import threading
from pathlib import Path
from typing import Any, Final

import dcap_qvl

from sealtorch.attestation.evidence import (
    Evidence,
    EvidenceProvider,
    EvidenceType,
    require_report_data,
)
from sealtorch.attestation.snp_report import parse_cert_table, parse_report, trim_cert_table
from sealtorch.errors import ConfigError, EvidenceError

__all__ = [
    "ATTESTER_NAMES",
    "GRAMINE_ROOT",
    "SEV_GUEST_DEVICE",
    "TDX_TSM_ROOT",
    "GramineAttester",
    "SnpAttester",
    "TdxAttester",
    "attester_for",
]

_log = logging.getLogger(__name__)

GRAMINE_ROOT: Final = "/dev/attestation"
TDX_TSM_ROOT: Final = "/sys/kernel/config/tsm/report"
SEV_GUEST_DEVICE: Final = "/dev/sev-guest"
# <linux/sev-guest.h>: _IOWR('S', nr, struct snp_guest_request_ioctl) (32 bytes)
SNP_GET_EXT_REPORT: Final = 0xC0205302
_SNP_VMM_ERR_INVALID_LEN: Final = 1
_PAGE: Final = 4096
#: ``--tee`` names accepted by :func:`attester_for`.
ATTESTER_NAMES: Final = ("sim", "gramine", "tdx", "snp")
_MAX_QUOTE: Final = 64 * 1024
_TSM_RETRIES: Final = 3


def _os_reason(exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied (run with the privileges the TEE device needs)"
    return exc.strerror or str(exc)


def _check_quote(quote: bytes, report_data: bytes, *, tdx: bool, source: str) -> None:
    try:
        parsed = dcap_qvl.parse_quote(quote)
        is_tdx = parsed.is_tdx()
        bound = bytes(parsed.report.report_data)
    except ValueError as exc:
        raise EvidenceError(f"{source} returned something that is not a DCAP quote: {exc}") from exc
    if is_tdx != tdx:
        raise EvidenceError(
            f"{source} returned a {'TDX' if is_tdx else 'SGX'} quote, expected "
            f"{'TDX' if tdx else 'SGX'}"
        )
    if bound != report_data:
        raise EvidenceError(
            f"{source} returned a quote for different report_data (another process is using "
            "the device at the same time?); retry"
        )


class GramineAttester:
    """SGX DCAP quotes from Gramine's ``/dev/attestation`` pseudo-files."""

    evidence_type: EvidenceType = "sgx-dcap"
    _process_lock = threading.Lock()  # the pseudo-files hold per-process state

    def __init__(self, root: str | os.PathLike[str] = GRAMINE_ROOT) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"GramineAttester(root={str(self.root)!r})"

    def evidence(self, report_data: bytes) -> Evidence:
        data = require_report_data(report_data)
        if not self.root.is_dir():
            raise EvidenceError(
                f"{self.root} does not exist: this process is not running inside Gramine-SGX "
                '(start it with gramine-sgx and sgx.remote_attestation = "dcap" in the '
                "manifest), or use --tee sim for development"
            )
        with self._process_lock:
            kind = self._read(self.root / "attestation_type", 64).decode("ascii", "replace").strip()
            if kind != "dcap":
                raise EvidenceError(
                    f"Gramine attestation type is {kind!r}, not 'dcap': set "
                    'sgx.remote_attestation = "dcap" in the Gramine manifest'
                )
            target = self.root / "user_report_data"
            try:
                with open(target, "wb", buffering=0) as handle:
                    written = handle.write(data)
            except OSError as exc:
                raise EvidenceError(f"cannot write {target}: {_os_reason(exc)}") from exc
            if written != len(data):
                raise EvidenceError(f"short write to {target}")
            quote = self._read(self.root / "quote", _MAX_QUOTE)
        if not quote:
            raise EvidenceError(f"{self.root / 'quote'} is empty: Gramine produced no quote")
        _check_quote(quote, data, tdx=False, source=f"{self.root / 'quote'}")
        return Evidence(type="sgx-dcap", data=quote)

    @staticmethod
    def _read(path: Path, limit: int) -> bytes:
        try:
            with open(path, "rb") as handle:
                return handle.read(limit)
        except FileNotFoundError as exc:
            raise EvidenceError(
                f"{path} is missing: Gramine attestation is not enabled (check the manifest)"
            ) from exc
        except OSError as exc:
            raise EvidenceError(f"cannot read {path}: {_os_reason(exc)}") from exc


class _TsmAttester:
    """The configfs-tsm report protocol, shared by the TDX and SEV-SNP attesters."""

    _provider: str = ""
    _guest: str = ""

    def __init__(self, root: str | os.PathLike[str] = TDX_TSM_ROOT) -> None:
        self.root = Path(root)

    # The kernel creates the attribute files when the entry directory is made and removes them
    # with it. These four methods are the whole contact surface with the kernel: a subclass
    # that overrides them stands in for configfs-tsm (the tests' fake kernel does).
    def create_entry(self, entry: Path) -> None:
        """Make the report entry directory ``entry`` (the kernel fills in its attributes)."""
        entry.mkdir(mode=0o700)

    def remove_entry(self, entry: Path) -> None:
        """Remove the report entry directory ``entry`` (the kernel drops its attributes)."""
        entry.rmdir()

    def _tsm_report(self, data: bytes, *, aux: bool) -> tuple[bytes, bytes, Path]:
        """(outblob, auxblob or b"", entry path) for report data ``data``."""
        entry = self.root / f"sealtorch-{os.getpid()}-{secrets.token_hex(6)}"
        try:
            self.create_entry(entry)
        except OSError as exc:
            raise EvidenceError(
                f"the kernel refused to create a report entry in {self.root}: {_os_reason(exc)}"
            ) from exc
        try:
            out, extra = self._blobs(entry, data, aux=aux)
        finally:
            try:
                self.remove_entry(entry)
            except OSError as exc:
                _log.warning("could not remove TSM report entry %s: %s", entry, exc.strerror)
        return out, extra, entry

    def _blobs(self, entry: Path, data: bytes, *, aux: bool) -> tuple[bytes, bytes]:
        provider = self.read_attribute(entry / "provider", 64).decode("ascii", "replace").strip()
        if provider != self._provider:
            raise EvidenceError(
                f"the TSM report provider is {provider!r}, not {self._provider!r}: this is not "
                f"a {self._guest} guest (other TEEs are not supported by this attester)"
            )
        for _ in range(_TSM_RETRIES):
            try:
                with open(entry / "inblob", "wb", buffering=0) as handle:
                    handle.write(data)
            except OSError as exc:
                raise EvidenceError(
                    f"the kernel refused the report data ({entry / 'inblob'}): {_os_reason(exc)}"
                ) from exc
            before = self.read_attribute(entry / "generation", 32)
            out = self.read_attribute(entry / "outblob", _MAX_QUOTE)
            extra = self.read_aux(entry / "auxblob") if aux else b""
            after = self.read_attribute(entry / "generation", 32)
            if before == after:
                if not out:
                    raise EvidenceError(
                        f"{entry / 'outblob'} is empty: the kernel produced no report"
                    )
                return out, extra
            _log.info("TSM report entry %s changed while reading (generation); retrying", entry)
        raise EvidenceError(
            f"another process kept writing {entry}; could not read a consistent report"
        )

    def read_aux(self, path: Path) -> bytes:
        """The host's certificates; absent or empty when the host supplies none."""
        try:
            with open(path, "rb") as handle:
                return handle.read(_MAX_QUOTE)
        except FileNotFoundError:
            return b""
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENODATA, errno.EINVAL):
                return b""
            raise EvidenceError(f"the kernel refused to read {path}: {_os_reason(exc)}") from exc

    def read_attribute(self, path: Path, limit: int) -> bytes:
        """Up to ``limit`` bytes of the report attribute file ``path``."""
        try:
            with open(path, "rb") as handle:
                return handle.read(limit)
        except FileNotFoundError as exc:
            raise EvidenceError(
                f"{path} is missing: this kernel's configfs-tsm does not look like the "
                "TSM report interface"
            ) from exc
        except OSError as exc:
            raise EvidenceError(
                f"the kernel refused to produce a quote ({path}): {_os_reason(exc)}"
            ) from exc


class TdxAttester(_TsmAttester):
    """TDX DCAP quotes through the Linux configfs-tsm report interface."""

    evidence_type: EvidenceType = "tdx-dcap"
    _provider = "tdx_guest"
    _guest = "TDX"

    def __repr__(self) -> str:
        return f"TdxAttester(root={str(self.root)!r})"

    def evidence(self, report_data: bytes) -> Evidence:
        data = require_report_data(report_data)
        if not self.root.is_dir():
            raise EvidenceError(
                f"{self.root} does not exist: configfs-tsm is not available (needs a TDX guest "
                "running Linux 6.7+ with CONFIG_TSM_REPORTS and configfs mounted at "
                "/sys/kernel/config), or use --tee sim for development"
            )
        quote, _, entry = self._tsm_report(data, aux=False)
        _check_quote(quote, data, tdx=True, source=f"{entry / 'outblob'}")
        return Evidence(type="tdx-dcap", data=quote)


class SnpAttester(_TsmAttester):
    """SEV-SNP attestation reports (with the host's certificates) from inside an SNP guest.

    configfs-tsm under ``root`` when it exists, else the ``/dev/sev-guest`` ioctl (``device``).
    The evidence is the report followed by the certificate table (see ``snp_report``).
    """

    evidence_type: EvidenceType = "sev-snp"
    _provider = "sev_guest"
    _guest = "SEV-SNP"

    def __init__(
        self,
        root: str | os.PathLike[str] = TDX_TSM_ROOT,
        *,
        device: str | os.PathLike[str] = SEV_GUEST_DEVICE,
    ) -> None:
        super().__init__(root=root)
        self.device = Path(device)

    def __repr__(self) -> str:
        return f"SnpAttester(root={str(self.root)!r}, device={str(self.device)!r})"

    def evidence(self, report_data: bytes) -> Evidence:
        data = require_report_data(report_data)
        if self.root.is_dir():
            report, table, entry = self._tsm_report(data, aux=True)
            source = f"{entry / 'outblob'}"
        elif self.device.exists():
            report, table = self._device_report(data)
            source = str(self.device)
        else:
            raise EvidenceError(
                f"neither {self.root} (configfs-tsm) nor {self.device} exists: this is not an "
                "SEV-SNP guest (or its sev-guest driver is not loaded), or use --tee sim for "
                "development"
            )
        try:
            parsed = parse_report(report)
            parse_cert_table(table)
        except EvidenceError as exc:
            raise EvidenceError(f"{source} returned no valid SNP report: {exc}") from exc
        if parsed.report_data != data:
            raise EvidenceError(
                f"{source} returned a report for different report_data (another process is "
                "using the device at the same time?); retry"
            )
        return Evidence(type="sev-snp", data=report + trim_cert_table(table))

    # -- /dev/sev-guest ------------------------------------------------------------------------

    def _ioctl(self, fd: int, request: int, arg: bytearray) -> None:
        """The one contact with the driver (tests replace it with a fake firmware)."""
        fcntl.ioctl(fd, request, arg, True)

    def _device_report(self, data: bytes) -> tuple[bytes, bytes]:
        try:
            fd = os.open(self.device, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise EvidenceError(f"cannot open {self.device}: {_os_reason(exc)}") from exc
        try:
            certs_len = 4 * _PAGE
            for _ in range(2):
                # struct snp_ext_report_req { snp_report_req (user_data[64], vmpl, rsvd[28]);
                #                             u64 certs_address; u32 certs_len; }
                certs = ctypes.create_string_buffer(certs_len)
                request = ctypes.create_string_buffer(112)
                struct.pack_into(
                    "<64sI28xQI", request, 0, data, 0, ctypes.addressof(certs), certs_len
                )
                response = ctypes.create_string_buffer(4000)
                # struct snp_guest_request_ioctl { u8 msg_version; u64 req_data, resp_data;
                #                                  u64 exitinfo2; }
                guest = bytearray(
                    struct.pack(
                        "<B7xQQQ", 1, ctypes.addressof(request), ctypes.addressof(response), 0
                    )
                )
                try:
                    self._ioctl(fd, SNP_GET_EXT_REPORT, guest)
                except OSError as exc:
                    vmm_error = struct.unpack_from("<Q", guest, 24)[0] >> 32
                    if vmm_error == _SNP_VMM_ERR_INVALID_LEN:
                        certs_len = struct.unpack_from("<I", request, 104)[0]
                        if 0 < certs_len <= 16 * _PAGE:
                            continue
                    if exc.errno == errno.ENOTTY:
                        raise EvidenceError(
                            f"{self.device} is not the SEV-SNP guest device (the ioctl is not "
                            "supported)"
                        ) from exc
                    raise EvidenceError(
                        f"the SEV-SNP firmware refused the report request ({self.device}): "
                        f"{_os_reason(exc)}"
                    ) from exc
                # struct snp_report_resp: status, report_size, reserved[24], report
                status, size = struct.unpack_from("<II", response, 0)
                if status != 0 or not 0 < size <= 4000 - 32:
                    raise EvidenceError(
                        f"the SEV-SNP firmware answered status 0x{status:x} ({self.device})"
                    )
                return response.raw[32 : 32 + size], certs.raw
            raise EvidenceError(f"{self.device} kept asking for a larger certificate buffer")
        finally:
            os.close(fd)


def attester_for(tee: str, **options: Any) -> EvidenceProvider:
    """The evidence provider for a ``--tee`` name: ``sim``, ``gramine``, ``tdx`` or ``snp``.

    ``options`` go to the provider: ``root=`` for gramine/tdx/snp; ``role=``, ``key_path=`` (and the
    test knobs) for sim. ``None`` values are ignored, so CLI options can be passed through.
    """
    options = {name: value for name, value in options.items() if value is not None}
    try:
        if tee == "sim":
            from sealtorch.attestation.sim import SimAttester

            return SimAttester(**options)
        if tee == "gramine":
            return GramineAttester(**options)
        if tee == "tdx":
            return TdxAttester(**options)
        if tee == "snp":
            return SnpAttester(**options)
    except TypeError as exc:
        raise ConfigError(f"invalid option for the {tee} attester: {exc}") from exc
    raise ConfigError(f"unknown TEE {tee!r}; choose one of {', '.join(ATTESTER_NAMES)}")
