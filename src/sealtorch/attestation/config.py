"""Build the verifiers a service needs from plain settings (key server, key cache, CLI)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from sealtorch.attestation.collateral import (
    Clock,
    CollateralDirectory,
    CollateralFile,
    CollateralSource,
    PccsCollateral,
    system_clock,
)
from sealtorch.attestation.dcap import DcapVerifier
from sealtorch.attestation.sim import SimVerifier
from sealtorch.attestation.snp import SnpVerifier
from sealtorch.attestation.snp_collateral import SnpCollateralDirectory
from sealtorch.attestation.verifier import Verifier, VerifierSet
from sealtorch.errors import ConfigError

__all__ = ["default_collateral_cache_dir", "make_verifiers"]


def default_collateral_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/sealtorch/collateral`` (``~/.cache/sealtorch/collateral``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sealtorch" / "collateral"


def make_verifiers(
    *,
    pccs_url: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    collateral_path: str | os.PathLike[str] | None = None,
    sim_trusted_keys: Iterable[str | bytes] = (),
    snp_collateral_dir: str | os.PathLike[str] | None = None,
    snp_allow_missing_crl_insecure: bool = False,
    clock: Clock = system_clock,
) -> VerifierSet:
    """A :class:`VerifierSet` for these settings.

    DCAP (SGX and TDX) is verified when ``pccs_url`` (cached in ``cache_dir``, default
    :func:`default_collateral_cache_dir`) or ``collateral_path`` (a collateral JSON file or a
    directory of them, fully offline) is given — not both. Sim evidence is accepted only when
    ``sim_trusted_keys`` lists at least one ``ed25519:<hex>`` key. AMD SEV-SNP is verified
    with the SNP collateral cache ``snp_collateral_dir``, which is by default the ``snp/``
    folder of the collateral directory or of the PCCS cache (so the key server's and the key
    cache's ``collateral_path`` / ``pccs_url`` settings cover SNP too). With nothing to verify
    with: :class:`~sealtorch.errors.ConfigError`.
    """
    if pccs_url is not None and collateral_path is not None:
        raise ConfigError("configure either a PCCS URL or a collateral file/directory, not both")
    if cache_dir is not None and pccs_url is None:
        raise ConfigError("a collateral cache directory only applies with a PCCS URL")
    verifiers: list[Verifier] = []
    source: CollateralSource | None = None
    if pccs_url is not None:
        source = PccsCollateral(
            pccs_url, cache_dir=cache_dir or default_collateral_cache_dir(), clock=clock
        )
    elif collateral_path is not None:
        path = Path(collateral_path)
        source = CollateralDirectory(path) if path.is_dir() else CollateralFile(path)
    if source is not None:
        verifiers.append(DcapVerifier(collateral=source))
    if snp_collateral_dir is None:
        if pccs_url is not None:
            snp_collateral_dir = Path(cache_dir or default_collateral_cache_dir()) / "snp"
        elif collateral_path is not None and Path(collateral_path).is_dir():
            snp_collateral_dir = Path(collateral_path) / "snp"
    if snp_collateral_dir is not None:
        verifiers.append(
            SnpVerifier(
                collateral=SnpCollateralDirectory(snp_collateral_dir),
                allow_missing_crl_insecure=snp_allow_missing_crl_insecure,
            )
        )
    keys = list(sim_trusted_keys)
    if keys:
        verifiers.append(SimVerifier(trusted_keys=keys))
    if not verifiers:
        raise ConfigError(
            "no attestation verifier is configured: give a PCCS URL or collateral (for SGX/TDX, "
            "and SNP from a collateral directory) and/or trusted sim attestation keys (for the "
            "simulated TEE)"
        )
    return VerifierSet(*verifiers)
