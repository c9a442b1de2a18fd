"""`sealtorch serve` as a real process: port 0, readiness, SIGTERM drain, failing to load."""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from serving_helpers import SealedSet, serve_command, stop, subprocess_env, wait_for_line

from sealtorch.keys import write_key_file

pytestmark = pytest.mark.slow


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        serve_command("serve", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )


def test_sigterm_drains_in_flight_requests_and_exits_0(sealed_set: SealedSet) -> None:
    with _start(
        str(sealed_set.sleeper),
        str(sealed_set.mlp),
        "--key-file",
        str(sealed_set.key_file),
        "--name",
        "slow",
        "--name",
        "mlp",
        "--port",
        "0",
        "--workers",
        "2",
        "--allow-arch",
        "serving_factories:sleeper",
        "--allow-arch",
        "serving_factories:tiny_classifier",
    ) as process:
        try:
            _drain(process)
        finally:
            stop(process)


def _drain(process: subprocess.Popen[str]) -> None:
    """Ready, one slow request in flight, SIGTERM: the request completes, exit status 0."""
    assert process.stdout is not None
    listening = wait_for_line(process.stdout, "listening on ", timeout=60)
    match = re.fullmatch(r"listening on (http://127\.0\.0\.1:(\d+))", listening)
    assert match, listening
    url = match.group(1)
    ready = wait_for_line(process.stdout, "ready on ", timeout=120)
    assert ready == f"ready on {url} (slow, mlp)"
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200
    assert httpx.get(f"{url}/v2/models/mlp").json()["versions"] == ["3"]

    results: list[httpx.Response] = []

    def slow_request() -> None:
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [2.5, 1]}]}
        results.append(httpx.post(f"{url}/v2/models/slow/infer", json=body, timeout=60))

    thread = threading.Thread(target=slow_request)
    thread.start()
    deadline = time.monotonic() + 20
    while "sealtorch_inference_in_flight 1.0" not in httpx.get(f"{url}/metrics").text:
        assert time.monotonic() < deadline, "the slow request never started"
        time.sleep(0.05)

    process.send_signal(signal.SIGTERM)
    thread.join(30)
    assert results, "the in-flight request got no answer"
    response = results[0]
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == [5.0, 2.0]
    assert process.wait(30) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/v2/health/live", timeout=5)
    assert process.stderr is not None
    log = process.stderr.read()
    assert "received SIGTERM" in log
    assert log.count("NO ATTESTATION") == 1  # the development key source says so, once


def test_a_model_that_fails_authentication_stops_the_server(
    sealed_set: SealedSet, tmp_path: Path
) -> None:
    wrong_key = tmp_path / "wrong.key"
    write_key_file(wrong_key)
    result = subprocess.run(
        serve_command("serve", str(sealed_set.mlp), "--key-file", str(wrong_key), "--port", "0"),
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert "listening on http://" in result.stdout
    assert "ready on" not in result.stdout
    assert "error: sealed file failed authentication" in result.stderr
    assert f"cannot serve model tiny-mlp from {sealed_set.mlp}" in result.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            ["--keys", "unix:///run/kc.sock", "--tee", "sim", "--keys-ca", "{existing}"],
            2,
            "--keys-ca applies to an https:// key source",
        ),
        (["--keys", "http://127.0.0.1:7443", "--tee", "sim"], 2, "plain http is refused"),
        (["--keys", "unix:///run/keycache.sock"], 2, "--keys needs --tee"),
        (["--keys", "unix:///run/keycache.sock", "--tee", "sim"], 2, "needs --keyserver-pubkey"),
        ([], 2, "exactly one key source"),
    ],
)
def test_key_source_errors_exit_before_serving(
    sealed_set: SealedSet, args: list[str], code: int, message: str
) -> None:
    args = [arg.replace("{existing}", str(sealed_set.mlp)) for arg in args]
    result = subprocess.run(
        serve_command("serve", str(sealed_set.mlp), "--port", "0", *args),
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
        check=False,
    )
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert "listening on" not in result.stdout
