"""Config file handling shared by the key server and key cache settings.

Both read a TOML file into pydantic sections that forbid unknown keys, report every invalid
setting in one :class:`~sealtorch.errors.ConfigError`, and resolve relative paths against a base
directory. Which file, which sections and which base are each side's own.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from sealtorch.errors import ConfigError

__all__ = [
    "ENVIRONMENT_VARIABLES",
    "Section",
    "VerifierSection",
    "check_environment",
    "file_sources",
    "format_errors",
    "read_toml",
    "resolve_path",
]


class Section(BaseModel):
    """A table of a config file: immutable, and an unknown key is an error (a typo, never a
    silently ignored setting)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class VerifierSection(Section):
    """How evidence is verified (the arguments of
    :func:`~sealtorch.attestation.make_verifiers`): the key server's ``[attestation]``, the key
    cache's ``[local]``."""

    sim_trusted_keys: tuple[str, ...] = ()
    pccs_url: str | None = None
    collateral_path: str | None = None
    collateral_cache_dir: str | None = None


#: The ``SEALTORCH_*`` variables sealtorch reads besides the settings' own (docs/cli.md and the
#: pages of each command); the test suite's own (``SEALTORCH_PG_BINDIR``...) are not refused
#: either, since only the server's own prefix and near-misses of a known name are checked.
ENVIRONMENT_VARIABLES: frozenset[str] = frozenset(
    {
        "SEALTORCH_ADMIN_TOKEN",
        "SEALTORCH_ADMIN_TOKEN_FILE",
        "SEALTORCH_KEYSERVER_CA",
        "SEALTORCH_KEYSERVER_DIR",
        "SEALTORCH_KEYSERVER_URL",
        "SEALTORCH_LOG_FORMAT",
        "SEALTORCH_PKCS11_PIN",
        "SEALTORCH_SERVE_KEYS_WAIT",
        "SEALTORCH_SIM_KEY",
    }
)


def check_environment(
    environ: Mapping[str, str], *, prefix: str, known: Iterable[str], docs: str
) -> None:
    """Refuse a misspelled setting variable, like an unknown config key: every variable under
    ``prefix`` must be one of ``known`` (or :data:`ENVIRONMENT_VARIABLES`), and a ``SEALTORCH_*``
    variable close to a known name (a typo in the prefix) is refused too. One line, with a
    did-you-mean."""
    names = sorted(set(known) | ENVIRONMENT_VARIABLES)
    for variable in sorted(environ):
        if not variable.startswith("SEALTORCH_") or variable in names:
            continue
        close = difflib.get_close_matches(variable, names, n=1, cutoff=0.8)
        if not variable.startswith(prefix) and not close:
            continue
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(
            f"unknown environment variable {variable[:100]} ({hint}check the spelling or unset "
            f"it; the variables are listed in {docs})"
        )


def read_toml(path: Path, *, missing: str) -> dict[str, Any]:
    """The TOML document at ``path``; ``missing`` is the error message when there is none."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as exc:
        raise ConfigError(missing) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc


def file_sources(raw: Mapping[str, Any]) -> dict[str, str]:
    """``{"section.key": "file"}`` for every key of every table of a config document."""
    return {
        f"{section}.{key}": "file"
        for section, values in raw.items()
        if isinstance(values, dict)
        for key in values
    }


def format_errors(exc: ValidationError, source: str, *, docs: str) -> str:
    """Every invalid setting of ``source``, one per line (``section.key: what is wrong``);
    unknown keys point to ``docs``, where the settings are described."""
    lines = []
    for error in exc.errors(include_url=False):
        location = ".".join(str(part) for part in error["loc"])
        message = (
            f"unknown setting (check the spelling; see {docs})"
            if error["type"] == "extra_forbidden"
            else str(error["msg"]).removeprefix("Value error, ")
        )
        lines.append(f"{location}: {message}")
    return f"{source} has invalid settings:\n  " + "\n  ".join(lines)


def resolve_path(base: Path | None, value: str | os.PathLike[str] | None) -> Path | None:
    """``value`` as a path (``~`` expanded), relative ones against ``base`` when given; an empty
    value is no path."""
    if value is None or value == "":
        return None
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    return path
