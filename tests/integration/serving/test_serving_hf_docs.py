"""docs/huggingface.md § Serving runs as written: build, seal, serve, curl the generate routes.

The block is run by bash as one script (its own ``serve ... &`` and ``kill %1``), in a fresh
directory, on a free port instead of 8080; every command must succeed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

pytest.importorskip("transformers")

DOCS = Path(__file__).resolve().parents[3] / "docs" / "huggingface.md"


def _serving_blocks() -> list[str]:
    text = DOCS.read_text(encoding="utf-8")
    section = text[text.index("## Serving: text in, text out") :]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```sh\n(.*?)```", section, re.DOTALL)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_the_serving_walkthrough_runs_as_written(tmp_path: Path) -> None:
    walkthrough, override = _serving_blocks()
    script = walkthrough
    assert "sealtorch serve chat.sealed" in script
    assert "/generate_stream" in script
    port = _free_port()
    script = "set -euo pipefail\n" + script.replace("8080", str(port))
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    process = subprocess.Popen(
        ["bash", "-c", script],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the server, if the script failed
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, output
    assert '"ready":true' in output
    assert '"text_output"' in output
    assert '"finish_reason": "length"' in output or '"finish_reason": "stop"' in output
    assert "data: {" in output

    # the --inputs example, on the files the walkthrough made: its server takes a "prompt"
    command = " ".join(override.replace("\\\n", " ").split()) + f" --port {port}"
    assert command.startswith("sealtorch serve chat.sealed")
    server = subprocess.Popen(
        ["bash", "-c", "exec " + command],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert server.stdout is not None
        for line in server.stdout:
            if line.startswith("ready on"):
                break
        else:
            raise AssertionError("the --inputs example did not start")
        metadata = httpx.get(f"http://127.0.0.1:{port}/v2/models/chat", timeout=30).json()
        assert [i["name"] for i in metadata["inputs"]] == ["input_ids", "prompt"]
    finally:
        server.terminate()
        server.wait(30)
        if server.stdout is not None:
            server.stdout.close()
