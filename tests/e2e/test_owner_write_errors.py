"""``encrypt``/``decrypt`` on a full disk, a read-only directory or past the file size limit
fail in one line naming the path and what to do, and leave no partial file (issue 14, item 4).

Before: a ~40-line traceback. Real conditions, not mocks: ``RLIMIT_FSIZE`` on the child
process; a read-only bind mount and a 64 KiB tmpfs in a private mount namespace (``unshare``),
skipped where unprivileged namespaces are not allowed.
"""

from __future__ import annotations

import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytestmark = pytest.mark.e2e

_SEALTORCH = [sys.executable, "-m", "sealtorch"]


@pytest.fixture
def model(tmp_path: Path) -> tuple[Path, Path, Path]:
    source = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(256, 256)}, source)
    key = tmp_path / "m.key"
    subprocess.run([*_SEALTORCH, "keygen", "-o", str(key)], check=True, capture_output=True)
    sealed = tmp_path / "m.sealed"
    subprocess.run(
        [
            *_SEALTORCH,
            "encrypt",
            str(source),
            "--key-file",
            str(key),
            "--model-id",
            "m",
            "-o",
            str(sealed),
        ],
        check=True,
        capture_output=True,
    )
    return source, key, sealed


def _one_line_failure(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (50 * 1024, 50 * 1024))


def test_file_size_limit(tmp_path: Path, model: tuple[Path, Path, Path]) -> None:
    source, key, sealed = model
    out = tmp_path / "out"
    out.mkdir()
    for command in (
        [
            "encrypt",
            str(source),
            "--key-file",
            str(key),
            "--model-id",
            "m",
            "-o",
            str(out / "x.sealed"),
        ],
        ["decrypt", str(sealed), "--key-file", str(key), "-o", str(out / "x.safetensors")],
    ):
        result = subprocess.run(
            [*_SEALTORCH, *command],
            capture_output=True,
            text=True,
            preexec_fn=_limit_file_size,
            check=False,
        )
        line = _one_line_failure(result)
        assert "File too large" in line
        assert str(out / "x.") in line
        assert "ulimit -f" in line
        assert list(out.iterdir()) == []  # no partial file


def _namespaces() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "true"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


def _in_namespace(setup: str, command: list[str]) -> subprocess.CompletedProcess[str]:
    script = f"{setup} && exec " + " ".join(f"'{part}'" for part in command)
    return subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.skipif(not _namespaces(), reason="needs unprivileged mount namespaces (unshare)")
def test_read_only_directory(tmp_path: Path, model: tuple[Path, Path, Path]) -> None:
    source, key, sealed = model
    target = tmp_path / "ro"
    target.mkdir()
    setup = f"mount --bind {target} {target} && mount -o remount,bind,ro {target}"
    for command, output in (
        (["encrypt", str(source), "--key-file", str(key), "--model-id", "m"], "x.sealed"),
        (["decrypt", str(sealed), "--key-file", str(key)], "x.safetensors"),
    ):
        result = _in_namespace(setup, [*_SEALTORCH, *command, "-o", str(target / output)])
        line = _one_line_failure(result)
        assert "Read-only file system" in line
        assert str(target) in line
        assert "-o" in line
        assert list(target.iterdir()) == []


@pytest.mark.skipif(not _namespaces(), reason="needs unprivileged mount namespaces (unshare)")
def test_full_disk(tmp_path: Path, model: tuple[Path, Path, Path]) -> None:
    source, key, sealed = model
    target = tmp_path / "tiny"
    target.mkdir()
    setup = f"mount -t tmpfs -o size=64k tmpfs {target}"
    for command, output in (
        (["encrypt", str(source), "--key-file", str(key), "--model-id", "m"], "x.sealed"),
        (["decrypt", str(sealed), "--key-file", str(key)], "x.safetensors"),
    ):
        result = _in_namespace(setup, [*_SEALTORCH, *command, "-o", str(target / output)])
        line = _one_line_failure(result)
        assert "No space left on device" in line
        assert str(target / output) in line
        assert "free space" in line
