"""Options that several commands share, so that they read and behave the same everywhere.

Every command that runs in (or asks) a TEE names it ``--tee``, the simulated TEE's key file
``--sim-key`` and the gramine/tdx/snp device directory ``--tee-root``; every verifier trusts
simulated evidence with ``--trust-sim-key``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

TEE_CHOICES = ("sim", "gramine", "tdx", "snp")
SIM_KEY_DEFAULT = "$SEALTORCH_SIM_KEY or ~/.local/share/sealtorch/sim-attestation.key"

_F = TypeVar("_F", bound=Callable[..., Any])


def tee_option(help: str, *, required: bool = False) -> Callable[[_F], _F]:
    """``--tee sim|gramine|tdx|snp``."""
    return click.option("--tee", type=click.Choice(TEE_CHOICES), required=required, help=help)


def sim_key_option(help: str = "") -> Callable[[_F], _F]:
    """``--sim-key FILE``: the simulated TEE's attestation key (0600; created when missing)."""
    return click.option(
        "--sim-key",
        type=click.Path(dir_okay=False, path_type=Path),
        help=help or f"--tee sim: the simulated attestation key file (default: {SIM_KEY_DEFAULT}).",
    )


def tee_root_option() -> Callable[[_F], _F]:
    """``--tee-root DIR``: the gramine/tdx/snp attestation device directory, if not the standard
    one."""
    return click.option(
        "--tee-root",
        type=click.Path(file_okay=False, path_type=Path),
        help="--tee gramine/tdx/snp: the attestation device directory, if not the standard one "
        "(/dev/attestation, /sys/kernel/config/tsm/report).",
    )


def trust_sim_key_option(help: str) -> Callable[[_F], _F]:
    """``--trust-sim-key ed25519:HEX`` (repeatable), stored in the ``sim_keys`` parameter."""
    return click.option(
        "--trust-sim-key", "sim_keys", multiple=True, metavar="ed25519:HEX", help=help
    )
