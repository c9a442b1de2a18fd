"""A real SoftHSM2 PKCS#11 token for the test session.

The token lives in a private temp directory; ``SOFTHSM2_CONF`` points at its configuration for
the whole session (SoftHSM2 reads it once, when the PKCS#11 module is first initialised in a
process, so one token per session — per xdist worker — is the unit). Tests that need isolation
use their own key labels (:meth:`SoftHsmToken.new_key_label`).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)

MISSING = (
    "SoftHSM2 is not installed ({what} not found). The key server's PKCS#11 tests use a real "
    "SoftHSM2 token: run `make test` (it installs the system packages), or "
    "`apt-get install softhsm2`."
)


@dataclass(frozen=True)
class SoftHsmToken:
    """An initialised SoftHSM2 token: module path, labels and PINs."""

    module: str
    conf: Path
    token_label: str
    user_pin: str = field(repr=False)
    so_pin: str = field(repr=False)

    def new_key_label(self, prefix: str = "test-key") -> str:
        """A label no other test uses."""
        return f"{prefix}-{secrets.token_hex(6)}"

    def environ(self) -> dict[str, str]:
        """Environment for a subprocess that must see this token."""
        return {**os.environ, "SOFTHSM2_CONF": str(self.conf)}


def find_module() -> str:
    configured = os.environ.get("SEALTORCH_SOFTHSM2_MODULE")
    for candidate in (configured, *MODULE_CANDIDATES):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail(MISSING.format(what="libsofthsm2.so"), pytrace=False)


@pytest.fixture(scope="session")
def softhsm_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsmToken]:
    """A fresh SoftHSM2 token (``SOFTHSM2_CONF`` set for the session)."""
    util = shutil.which("softhsm2-util")
    if util is None:
        pytest.fail(MISSING.format(what="softhsm2-util"), pytrace=False)
    module = find_module()
    root = tmp_path_factory.mktemp("softhsm")
    tokens = root / "tokens"
    tokens.mkdir(mode=0o700)
    conf = root / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
        "log.level = ERROR\nslots.removable = false\n"
    )
    token = SoftHsmToken(
        module=module,
        conf=conf,
        token_label=f"sealtorch-test-{secrets.token_hex(3)}",
        user_pin=secrets.token_hex(8),
        so_pin=secrets.token_hex(8),
    )
    subprocess.run(
        [
            util,
            "--init-token",
            "--free",
            "--label",
            token.token_label,
            "--so-pin",
            token.so_pin,
            "--pin",
            token.user_pin,
        ],
        check=True,
        capture_output=True,
        env=token.environ(),
        timeout=60,
    )
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    try:
        yield token
    finally:
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous
