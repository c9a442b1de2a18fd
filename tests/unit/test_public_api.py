"""The public API is a promise: this test locks it, so changes are deliberate."""

from __future__ import annotations

import subprocess
import sys

import pytest

import sealtorch

EXPECTED_ALL = {
    "DataKey",
    "Error",
    "KeyFile",
    "KeyProvider",
    "StaticKey",
    "__version__",
    "decrypt_model",
    "encrypt_model",
    "generate_key",
    "inspect_sealed",
    "load_model",
    "load_sealed_model",
    "load_state_dict",
    "rewrap",
}


def test_all_is_locked() -> None:
    assert set(sealtorch.__all__) == EXPECTED_ALL


def test_every_public_name_resolves() -> None:
    for name in sealtorch.__all__:
        assert getattr(sealtorch, name) is not None, name


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_thing"):
        sealtorch.no_such_thing  # noqa: B018


def test_import_is_cheap() -> None:
    """`import sealtorch` and the CLI root must not import PyTorch or the server stacks."""
    code = (
        "import sys, sealtorch, sealtorch.cli;"
        "heavy = [m for m in ('torch', 'fastapi', 'uvicorn', 'sqlalchemy', 'timm')"
        " if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert out == ""
