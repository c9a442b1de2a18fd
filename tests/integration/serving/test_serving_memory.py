"""Memory of one large JSON request, measured on a real ``sealtorch serve`` process: a 50 MiB
JSON body stays within the bound docs/serving.md states — the body, plus twice the decoded
tensor, plus 32 MiB — and the server answers health probes while it parses. (Parsed whole with
``json.loads``, the same body took about 13 times its tensor.)"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
from pathlib import Path

import httpx
import pytest
import torch
from serving_helpers import serve_command, stop, subprocess_env, wait_for_line
from torch import nn

import sealtorch
from sealtorch.keys import write_key_file

pytestmark = pytest.mark.slow

MIB = 1024 * 1024
COLUMNS = 64


class ColumnSum(nn.Module):
    """Sums its rows: a large input, a small output (the response costs nothing)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=0)


def _status(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` memory figure, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _reset_peak(pid: int) -> None:
    """Make the peak resident size (VmHWM) the current one (Linux ``clear_refs``)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError as exc:
        pytest.skip(f"cannot reset the peak memory figure of a process here: {exc}")


def _measure(pid: int, address: tuple[str, int], body: bytes) -> tuple[int, int, bytes, int]:
    """Send ``body`` as an inference request while probing ``/v2/health/live``: the server's
    peak memory growth, the response status and body, and the probes answered after the body
    was sent and before the response came."""
    _reset_peak(pid)
    before = _status(pid, "VmRSS")
    uploaded, answered = threading.Event(), threading.Event()
    responses: list[bytes] = []

    def post() -> None:
        with socket.create_connection(address, timeout=600) as sock:
            sock.sendall(
                b"POST /v2/models/column-sum/infer HTTP/1.1\r\nHost: test\r\n"
                b"Content-Type: application/json\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body)
            )
            sock.sendall(body)
            uploaded.set()
            response = b""
            while chunk := sock.recv(65536):
                response += chunk
            responses.append(response)
        answered.set()

    thread = threading.Thread(target=post, daemon=True)
    thread.start()
    assert uploaded.wait(600), "the body was not sent"
    probes = 0
    with httpx.Client(base_url=f"http://{address[0]}:{address[1]}", timeout=60) as client:
        while not answered.is_set():
            live = client.get("/v2/health/live").status_code == 200
            probes += live and not answered.is_set()
            answered.wait(0.05)
    thread.join(60)
    peak = _status(pid, "VmHWM")
    head, _, answer = responses[0].partition(b"\r\n\r\n")
    return peak - before, int(head.split()[1]), answer, probes


def test_a_50_mib_json_request_stays_within_its_memory_bound(tmp_path: Path) -> None:
    key = write_key_file(tmp_path / "sum.key")
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(
        ColumnSum(), (torch.zeros(2, COLUMNS),), dynamic_shapes=({0: batch},)
    )
    sealtorch.encrypt_model(program, tmp_path / "sum.sealed", model_id="column-sum", key=key)

    rows = 50 * MIB // (4 * COLUMNS)  # "0.5," is 4 bytes: a 50 MiB body
    elements = rows * COLUMNS
    data = b"[" + b",".join([b"0.5"] * elements) + b"]"
    head = {"name": "x", "datatype": "FP32", "shape": [rows, COLUMNS]}
    body = b'{"inputs": [' + json.dumps(head)[:-1].encode() + b', "data": ' + data + b"}]}"
    del data
    tensor_bytes = elements * 4
    bound = len(body) + 2 * tensor_bytes + 32 * MIB

    command = serve_command(
        "serve", str(tmp_path / "sum.sealed"), "--key-file", str(tmp_path / "sum.key"),
        "--port", "0", "--threads", "1", "--max-body-size", "64MiB",
        "--max-json-elements", str(elements + 100),
    )  # fmt: skip
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=subprocess_env()
    ) as process:
        try:
            assert process.stdout is not None
            listening = wait_for_line(process.stdout, "listening on ", timeout=60)
            match = re.fullmatch(r"listening on http://([\d.]+):(\d+)", listening)
            assert match, listening
            wait_for_line(process.stdout, "ready on ", timeout=180)
            figures = _measure(process.pid, (match.group(1), int(match.group(2))), body)
        finally:
            stop(process)

    growth, status, answer, probes = figures
    print(  # the figure docs/serving.md quotes (pytest -s)
        f"\n50 MiB JSON body, {elements:,} FP32 elements ({tensor_bytes / MIB:.0f} MiB): peak "
        f"growth {growth / MIB:.1f} MiB = {growth / tensor_bytes:.2f}x the tensor; bound "
        f"{bound / MIB:.0f} MiB; {probes} health probes answered meanwhile"
    )
    assert status == 200, answer
    assert json.loads(answer)["outputs"][0]["data"] == [0.5 * rows] * COLUMNS
    assert growth <= bound
    assert probes >= 3
