"""The simulated TEE cannot be switched on silently (issue 12, item 4), tested on real
``sealtorch keyserver`` processes: trusted sim keys from the environment or the config file stop
the server from starting unless ``--allow-simulated-tee-insecure`` (or the config's opt-in) is
given; with it, the start and every sim release are logged at WARNING, counted and shown by the
probes.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest

from _fixtures.keyserver import init_dir, sealtorch_command, start_serve
from sealtorch._crypto.tls import client_ssl_context
from sealtorch.attestation import SimAttester
from sealtorch.client import AdminClient, KeyReleaseClient, read_token

pytestmark = pytest.mark.e2e

SIM_ENV = "SEALTORCH_KEYSERVER_ATTESTATION_SIM_TRUSTED_KEYS"


@pytest.fixture
def attester(tmp_path: Path) -> SimAttester:
    return SimAttester(role="app", key_path=tmp_path / "sim.key")


def _init_without_sim(tmp_path: Path) -> tuple[Path, Path]:
    data, token_file = tmp_path / "ks", tmp_path / "admin.token"
    subprocess.run(
        sealtorch_command("keyserver", "init", str(data), "--admin-token-file", str(token_file)),
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return data, token_file


def _serve_fails(data: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        sealtorch_command("keyserver", "serve", str(data), "--port", "0"),
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_sim_key_from_the_environment_refused_without_the_flag_then_loud_with_it(
    tmp_path: Path, attester: SimAttester
) -> None:
    data, token_file = _init_without_sim(tmp_path)
    env = {SIM_ENV: attester.public_key}
    refused = _serve_fails(data, env)
    assert refused.returncode == 2
    assert "listening" not in refused.stdout
    message = refused.stderr.strip()
    assert len(message.splitlines()) == 1
    assert SIM_ENV in message
    assert "refusing to start" in message
    assert "--allow-simulated-tee-insecure" in message

    server = start_serve(data, "--allow-simulated-tee-insecure", env=env, log_dir=tmp_path / "logs")
    try:
        ca = data / "tls" / "ca.crt"
        verify = client_ssl_context(ca_path=ca)
        assert httpx.get(f"{server.url}/healthz", verify=verify).json()["simulated_tee"] is True
        assert httpx.get(f"{server.url}/readyz", verify=verify).json()["simulated_tee"] is True
        with AdminClient(server.url, token=read_token(token_file=token_file), ca=ca) as admin:
            admin.create_model("m")
            admin.set_policy(
                "m", {"allowed_tees": ["sim"], "sim": {"mrenclave": [attester.mrenclave]}}
            )
            admin.create_model("other")
            admin.set_policy("other", {"allowed_tees": ["sim"], "sim": {"mrenclave": ["00" * 32]}})
        with KeyReleaseClient(
            server.url, attester=attester, ca=ca, trusted_release_keys=[server.release_key]
        ) as client:
            assert client.release(["m"]).keys
            assert not client.release(["other"]).keys  # denied: still a sim release
        metrics = httpx.get(f"{server.url}/metrics", verify=verify).text
        assert "sealtorch_keyserver_simulated_tee_trusted 1.0" in metrics
        assert 'sealtorch_keyserver_simulated_tee_releases_total{decision="allow"} 1.0' in metrics
        assert 'sealtorch_keyserver_simulated_tee_releases_total{decision="deny"} 1.0' in metrics
    finally:
        server.stop()
    records = [json.loads(line) for line in server.logs().splitlines() if line.startswith("{")]
    warnings = [r for r in records if r["level"] == "warning" and "INSECURE" in r["message"]]
    assert any(attester.public_key in r["message"] for r in warnings)  # the start
    decided = [r["message"] for r in warnings if "simulated-TEE evidence" in r["message"]]
    assert len(decided) == 2
    assert any(": allow (" in m for m in decided)
    assert any(": deny (" in m for m in decided)


def test_sim_key_in_the_config_needs_the_opt_in(tmp_path: Path, attester: SimAttester) -> None:
    data, _ = init_dir(tmp_path, attester)
    config = data / "keyserver.toml"
    text = config.read_text()
    assert "allow_simulated_tee_insecure = true" in text  # init --trust-sim-key opted in, visibly
    config.write_text(
        text.replace("allow_simulated_tee_insecure = true", "allow_simulated_tee_insecure = false")
    )
    refused = _serve_fails(data)
    assert refused.returncode == 2
    assert "keyserver.toml" in refused.stderr
    assert "--allow-simulated-tee-insecure" in refused.stderr
    # The environment cannot turn it off silently either way: the flag alone opts in.
    server = start_serve(data, "--allow-simulated-tee-insecure", log_dir=tmp_path / "logs")
    server.stop()
    assert "INSECURE: the simulated TEE is trusted" in server.logs()


def test_without_sim_keys_nothing_changes(tmp_path: Path) -> None:
    data, _ = _init_without_sim(tmp_path)
    assert "allow_simulated_tee_insecure = false" in (data / "keyserver.toml").read_text()
    server = start_serve(data, log_dir=tmp_path / "logs")
    try:
        verify = client_ssl_context(ca_path=data / "tls" / "ca.crt")
        assert httpx.get(f"{server.url}/healthz", verify=verify).json() == {
            "status": "ok",
            "simulated_tee": False,
        }
        metrics = httpx.get(f"{server.url}/metrics", verify=verify).text
        assert "sealtorch_keyserver_simulated_tee_trusted 0.0" in metrics
    finally:
        server.stop()
    assert "simulated TEE is trusted" not in server.logs()
