"""`sealtorch serve` as a real process, given sealed files that name code (issue 12): it refuses
them with the reason and how to allow a factory, exits 1, and the code never runs - the marker
file it would write never appears, although the module that writes it is importable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from serving_helpers import serve_command, subprocess_env

import sealtorch
from sealtorch.keys import write_key_file

PAYLOADS = Path(__file__).resolve().parents[2] / "unit" / "payloads"
sys.path.insert(0, str(PAYLOADS))
import hostile_programs  # noqa: E402 - from the payload tests' folder

pytestmark = pytest.mark.slow


def _serve(
    sealed: Path, key_file: Path, marker: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(PAYLOADS), env["PYTHONPATH"]])  # marker_module
    env[hostile_programs.MARKER_ENV] = str(marker)
    return subprocess.run(
        serve_command("serve", str(sealed), "--key-file", str(key_file), "--port", "0", *args),
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )


@pytest.mark.parametrize(
    ("ref", "kwargs"),
    [
        ("os:system", {"command": "touch MARKER"}),
        ("marker_module:build", {}),
    ],
)
def test_serve_refuses_architectures_it_does_not_allow(
    ref: str, kwargs: dict[str, str], tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    key_file = tmp_path / "model.key"
    key = write_key_file(key_file)
    sealed = tmp_path / "hostile.sealed"
    sealtorch.encrypt_model(
        torch.nn.Linear(8, 3).state_dict(),
        sealed,
        model_id="hostile",
        key=key,
        arch=ref,
        arch_kwargs={k: v.replace("MARKER", str(marker)) for k, v in kwargs.items()},
        check_arch=False,  # what --skip-arch-check does: anyone with the key can write this
    )
    result = _serve(sealed, key_file, marker, "--allow-arch", "serving_factories:tiny_classifier")
    assert result.returncode == 1, result.stderr
    assert "ready on" not in result.stdout
    assert f"the sealed architecture {ref} is not allowed on this machine" in result.stderr
    assert f"--allow-arch {ref}" in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("case", ["pickled constant", "guard code", "imported function"])
def test_serve_refuses_programs_that_would_run_code(case: str, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    key_file = tmp_path / "model.key"
    key = write_key_file(key_file)
    payload = hostile_programs.HOSTILE[case](marker, "marker_module")
    sealed = hostile_programs.seal_raw(
        tmp_path / "hostile.sealed", payload, kind="torch_export", key=key
    )
    result = _serve(sealed, key_file, marker)
    assert result.returncode == 1, result.stderr
    assert "refusing this torch.export program" in result.stderr
    assert not marker.exists()


def test_allow_arch_takes_factories_only(tmp_path: Path) -> None:
    key_file = tmp_path / "model.key"
    key = write_key_file(key_file)
    sealed = tmp_path / "m.sealed"
    sealtorch.encrypt_model(torch.nn.Linear(8, 3).state_dict(), sealed, model_id="m", key=key)
    result = _serve(sealed, key_file, tmp_path / "marker", "--allow-arch", "timm:resnet18")
    assert result.returncode == 2, result.stderr
    assert "torchvision: and timm: models are always allowed" in result.stderr
