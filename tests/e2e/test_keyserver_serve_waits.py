"""``sealtorch serve`` waits for its key source (issue 14, item 3/4): start order is a matter of
time. Before: it gave up after about four attempts when the key server (or cache) was not up
yet. Now it retries for up to ``--keys-wait`` seconds, logging each retry, and gives up with one
line after that.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import sealtorch
from sealtorch._demo.processes import ServiceProcess
from sealtorch.attestation import measure
from sealtorch.attestation.sim import SimAttester
from sealtorch.client import AdminClient, KeyServerWrapper
from sealtorch.keyserver.datadir import InitResult, init_data_dir

pytestmark = pytest.mark.e2e

MODEL_ID = "tiny-linear"
ARCH = {"in_features": 4, "out_features": 3}


@pytest.fixture
def sealed_with_keyserver_down(
    tmp_path: Path,
) -> Iterator[tuple[InitResult, Path, str, dict[str, str], list[ServiceProcess]]]:
    """A sealed model whose key server has been stopped; yields its last port."""
    sim_key = tmp_path / "sim.key"
    env = {"SEALTORCH_SIM_KEY": str(sim_key)}
    public = SimAttester(role="serve", key_path=sim_key).public_key
    init = init_data_dir(tmp_path / "ks", sim_trusted_keys=[public])
    processes: list[ServiceProcess] = []
    try:
        keyserver = ServiceProcess(
            "keyserver",
            ["keyserver", "serve", str(init.data_dir), "--port", "0"],
            log_dir=tmp_path,
            env=env,
        )
        processes.append(keyserver)
        url = keyserver.wait_for(r"^listening on (\S+)", timeout=60).group(1)
        with AdminClient(url, token=init.admin_token, ca=init.ca_path) as admin:
            admin.create_model(MODEL_ID)
            admin.set_policy(
                MODEL_ID, {"allowed_tees": ["sim"], "sim": {"mrenclave": [measure("serve")]}}
            )
            sealed = tmp_path / "model.sealed"
            sealtorch.encrypt_model(
                torch.nn.Linear(**ARCH).eval(),
                sealed,
                model_id=MODEL_ID,
                key=KeyServerWrapper(admin),
                arch="torch.nn:Linear",
                arch_kwargs=ARCH,
            )
        keyserver.stop()
        yield init, sealed, url, env, processes
    finally:
        for process in reversed(processes):
            process.stop()


def _serve_args(init: InitResult, sealed: Path, url: str, wait: float) -> list[str]:
    return [
        "serve", str(sealed), "--keys", url, "--keys-ca", str(init.ca_path),
        "--keyserver-pubkey", init.release_public_key, "--tee", "sim", "--port", "0",
        "--allow-arch", "torch.nn:Linear", "--keys-wait", str(wait),
    ]  # fmt: skip


def test_serve_waits_for_a_key_server_that_starts_later(
    tmp_path: Path,
    sealed_with_keyserver_down: tuple[InitResult, Path, str, dict[str, str], list[ServiceProcess]],
) -> None:
    init, sealed, url, env, processes = sealed_with_keyserver_down
    serve = ServiceProcess("serve", _serve_args(init, sealed, url, 60), log_dir=tmp_path, env=env)
    processes.append(serve)
    deadline = time.monotonic() + 60
    while not any("no key source answered" in line for line in serve.log_lines()):
        assert time.monotonic() < deadline, serve.tail()
        time.sleep(0.1)
    # The key server comes up (on the port serve was told), a few seconds late.
    port = url.rsplit(":", 1)[1]
    keyserver = ServiceProcess(
        "keyserver-again",
        ["keyserver", "serve", str(init.data_dir), "--port", port],
        log_dir=tmp_path,
        env=env,
    )
    processes.append(keyserver)
    serve.wait_for(r"^ready on ", timeout=90)
    assert any("waiting up to 60 s" in line for line in serve.log_lines())


def test_serve_gives_up_after_keys_wait_in_one_line(
    sealed_with_keyserver_down: tuple[InitResult, Path, str, dict[str, str], list[ServiceProcess]],
) -> None:
    init, sealed, url, env, _ = sealed_with_keyserver_down
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "sealtorch", *_serve_args(init, sealed, url, 2)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
        check=False,
    )
    assert result.returncode != 0
    assert time.monotonic() - started < 60
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, result.stderr
    assert "cannot reach a key source" in errors[0]
    assert url in errors[0]
