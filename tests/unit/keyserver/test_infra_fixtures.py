"""The infrastructure fixtures fail loudly (never skip) when PostgreSQL or SoftHSM2 is missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from _fixtures import postgres, softhsm


def test_missing_postgres_binaries_fail_with_instructions(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SEALTORCH_PG_BINDIR", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="run `make test`"):
        postgres.find_bindir()


def test_missing_softhsm_module_fails_with_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(softhsm, "MODULE_CANDIDATES", ())
    monkeypatch.setenv("SEALTORCH_SOFTHSM2_MODULE", "/nonexistent/libsofthsm2.so")
    with pytest.raises(pytest.fail.Exception, match="run `make test`"):
        softhsm.find_module()


def test_binaries_are_found_on_this_machine() -> None:
    assert (postgres.find_bindir() / "initdb").is_file()
    assert Path(softhsm.find_module()).is_file()


def test_service_facing_modules_do_not_import_sqlalchemy_or_pkcs11() -> None:
    """The service layer sees only the Store protocol and records: importing them stays light."""
    code = (
        "import sys\n"
        "import sealtorch.keyserver.store, sealtorch.keyserver.records\n"
        "import sealtorch.protocol.audit, sealtorch.keyserver.tokens\n"
        "import sealtorch.keyserver.masterkey\n"
        "print(','.join(m for m in ('sqlalchemy', 'pkcs11', 'psycopg', 'fastapi') "
        "if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""
