"""Evidence providers for real TEEs — Gramine-SGX and TDX (configfs-tsm) — and a factory.

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

import errno
import logging
import os
import secrets
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
from sealtorch.errors import ConfigError, EvidenceError

__all__ = [
    "ATTESTER_NAMES",
    "GRAMINE_ROOT",
    "TDX_TSM_ROOT",
    "GramineAttester",
    "TdxAttester",
    "attester_for",
]

_log = logging.getLogger(__name__)

GRAMINE_ROOT: Final = "/dev/attestation"
TDX_TSM_ROOT: Final = "/sys/kernel/config/tsm/report"
#: ``--tee`` names accepted by :func:`attester_for`.
ATTESTER_NAMES: Final = ("sim", "gramine", "tdx")
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


class TdxAttester:
    """TDX DCAP quotes through the Linux configfs-tsm report interface."""

    evidence_type: EvidenceType = "tdx-dcap"

    def __init__(self, root: str | os.PathLike[str] = TDX_TSM_ROOT) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"TdxAttester(root={str(self.root)!r})"

    # The kernel creates the attribute files when the entry directory is made and removes them
    # with it; these two methods are the whole contact surface with that behaviour.
    def _create_entry(self, entry: Path) -> None:
        entry.mkdir(mode=0o700)

    def _remove_entry(self, entry: Path) -> None:
        entry.rmdir()

    def evidence(self, report_data: bytes) -> Evidence:
        data = require_report_data(report_data)
        if not self.root.is_dir():
            raise EvidenceError(
                f"{self.root} does not exist: configfs-tsm is not available (needs a TDX guest "
                "running Linux 6.7+ with CONFIG_TSM_REPORTS and configfs mounted at "
                "/sys/kernel/config), or use --tee sim for development"
            )
        entry = self.root / f"sealtorch-{os.getpid()}-{secrets.token_hex(6)}"
        try:
            self._create_entry(entry)
        except OSError as exc:
            raise EvidenceError(
                f"the kernel refused to create a report entry in {self.root}: {_os_reason(exc)}"
            ) from exc
        try:
            quote = self._quote(entry, data)
        finally:
            try:
                self._remove_entry(entry)
            except OSError as exc:
                _log.warning("could not remove TSM report entry %s: %s", entry, exc.strerror)
        _check_quote(quote, data, tdx=True, source=f"{entry / 'outblob'}")
        return Evidence(type="tdx-dcap", data=quote)

    def _quote(self, entry: Path, data: bytes) -> bytes:
        provider = self._read(entry / "provider", 64).decode("ascii", "replace").strip()
        if provider != "tdx_guest":
            raise EvidenceError(
                f"the TSM report provider is {provider!r}, not 'tdx_guest': this is not a TDX "
                "guest (other TEEs are not supported by this attester)"
            )
        for _ in range(_TSM_RETRIES):
            try:
                with open(entry / "inblob", "wb", buffering=0) as handle:
                    handle.write(data)
            except OSError as exc:
                raise EvidenceError(
                    f"the kernel refused the report data ({entry / 'inblob'}): {_os_reason(exc)}"
                ) from exc
            before = self._read(entry / "generation", 32)
            quote = self._read(entry / "outblob", _MAX_QUOTE)
            after = self._read(entry / "generation", 32)
            if before == after:
                if not quote:
                    raise EvidenceError(
                        f"{entry / 'outblob'} is empty: the kernel produced no quote"
                    )
                return quote
            _log.info("TSM report entry %s changed while reading (generation); retrying", entry)
        raise EvidenceError(
            f"another process kept writing {entry}; could not read a consistent quote"
        )

    @staticmethod
    def _read(path: Path, limit: int) -> bytes:
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


def attester_for(tee: str, **options: Any) -> EvidenceProvider:
    """The evidence provider for a ``--tee`` name: ``sim``, ``gramine`` or ``tdx``.

    ``options`` go to the provider: ``root=`` for gramine/tdx; ``role=``, ``key_path=`` (and the
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
    except TypeError as exc:
        raise ConfigError(f"invalid option for the {tee} attester: {exc}") from exc
    raise ConfigError(f"unknown TEE {tee!r}; choose one of {', '.join(ATTESTER_NAMES)}")
