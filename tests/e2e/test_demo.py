"""`sealtorch demo` (the README's main job) runs to completion, and cleans up after Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.xdist_group("demo")]


def _demo(*args: str, **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sealtorch", "demo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        **kwargs,  # type: ignore[call-overload]
    )


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def test_the_demo_runs_to_completion(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    process = _demo("--workdir", str(workdir), "--requests", "2")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output

    chelsea = output.split("chelsea.png", 1)[1].split("coffee.png", 1)[0]
    top3 = [line for line in chelsea.splitlines() if "│" in line][:3]
    assert any(cat in " ".join(top3) for cat in ("tabby", "tiger cat", "Egyptian cat")), chelsea
    coffee = output.split("coffee.png", 1)[1]
    first = next(line for line in coffee.splitlines() if "│" in line)
    assert "espresso" in first, coffee
    assert output.count("bit-identical to plain PyTorch on the same weights: yes") == 2
    assert re.search(r"tensor names readable in the sealed file: 0 of 296", output)
    assert "refused: measurement_mismatch" in output
    # serve pointed at a fake key source (the host's own key, no release statement) refuses it
    assert re.search(r"serve refused it and exited \(1\): statement_missing", output), output
    for step in ("attestation + key release", "authenticate + decrypt", "steady-state"):
        assert step in output
    # --workdir is kept, with the logs of every service; no service is left running.
    assert {p.name for p in (workdir / "logs").iterdir()} == {
        "keyserver.log",
        "keycache.log",
        "serve.log",
        "serve-fake.log",
    }
    assert (workdir / "efficientnet-lite0.sealed").is_file()
    assert _children_of(process.pid) == []


def test_ctrl_c_stops_every_service_and_removes_the_workspace() -> None:
    process = _demo()
    assert process.stdout is not None
    workspace = None
    lines = []
    deadline = time.monotonic() + 240
    for line in process.stdout:
        lines.append(line)
        if line.startswith("Workspace: "):
            workspace = Path(line.split(":", 1)[1].strip())
        if "key cache: attested" in line:
            break
        assert time.monotonic() < deadline, "".join(lines)
    assert workspace is not None, "".join(lines)
    children = _children_of(process.pid)
    assert children, "the demo should be running its services now"
    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=60)
    assert process.returncode == 130, "".join(lines) + rest
    assert "interrupted" in rest
    assert not workspace.exists()
    for pid in children:
        assert (
            not Path(f"/proc/{pid}").exists()
            or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
        ), f"service process {pid} survived Ctrl-C"
