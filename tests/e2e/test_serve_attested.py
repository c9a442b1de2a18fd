"""The whole stack as real processes: key server → key cache → `sealtorch serve --keys`.

An inference server whose measurement the model's policy does not allow is refused by the key
cache and exits non-zero with the reason codes; once the owner allows it (policy change on the
key server, picked up by the cache at its next refresh), the same command serves, and its
outputs are bit-identical to plain PyTorch. A fake key source in the cache's place (the host's
own key, with no statement or a genuine statement about another key) is refused by serve.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

import sealtorch
from sealtorch._demo.fakesource import ANYTHING_GOES, FakeGrant, FakeKeySource
from sealtorch._demo.processes import ServiceProcess
from sealtorch.attestation import Policy, measure
from sealtorch.attestation.sim import SimAttester
from sealtorch.client import AdminClient, KeyReleaseClient, KeyServerWrapper, ReleasedKey
from sealtorch.keys import generate_key
from sealtorch.keyserver.datadir import init_data_dir
from sealtorch.protocol import SignedStatement

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL_ID = "tiny-linear"
ARCH_KWARGS = {"in_features": 4, "out_features": 3}


def _policy(*roles: str) -> dict[str, object]:
    return {
        "version": 1,
        "name": "e2e",
        "allowed_tees": ["sim"],
        "sim": {"mrenclave": sorted(measure(role) for role in roles)},
    }


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict[str, object]]:
    sim_key = tmp_path / "sim.key"
    env = {"SEALTORCH_SIM_KEY": str(sim_key)}
    public = SimAttester(role="serve", key_path=sim_key).public_key
    logs = tmp_path / "logs"
    logs.mkdir()
    init = init_data_dir(tmp_path / "ks", sim_trusted_keys=[public])
    processes: list[ServiceProcess] = []

    def start(name: str, args: list[str]) -> ServiceProcess:
        process = ServiceProcess(name, args, log_dir=logs, env=env)
        processes.append(process)
        return process

    try:
        keyserver = start("keyserver", ["keyserver", "serve", str(init.data_dir), "--port", "0"])
        url = keyserver.wait_for(r"^listening on (\S+)", timeout=60).group(1)
        admin = AdminClient(url, token=init.admin_token, ca=init.ca_path)
        admin.create_model(MODEL_ID)
        admin.set_policy(MODEL_ID, _policy("keycache"))  # the inference server is NOT allowed

        torch.manual_seed(7)
        plain = torch.nn.Linear(**ARCH_KWARGS).eval()
        sealed = tmp_path / "model.sealed"
        sealtorch.encrypt_model(
            plain,
            sealed,
            model_id=MODEL_ID,
            key=KeyServerWrapper(admin),
            arch="torch.nn:Linear",
            arch_kwargs=ARCH_KWARGS,
        )
        socket = tmp_path / "kc.sock"
        cache = start(
            "keycache",
            [
                "keycache", "serve", "--keyserver", url, "--ca", str(init.ca_path),
                "--keyserver-pubkey", init.release_public_key, "--tee", "sim",
                "--sim-key", str(sim_key), "--socket", str(socket),
                "--trust-sim-key", public, "--allow-simulated-tee-insecure", "--refresh", "60",
            ],
        )  # fmt: skip
        cache.wait_for(r"^ready: ", timeout=60)
        yield {
            "admin": admin,
            "cache": cache,
            "sealed": sealed,
            "socket": socket,
            "env": env,
            "pin": init.release_public_key,
            "plain": plain,
            "logs": logs,
            "start": start,
        }
        admin.close()
    finally:
        for process in reversed(processes):
            process.stop()


def _wait_until_the_cache_releases_to_serve(stack: dict[str, object]) -> None:
    attester = SimAttester(role="serve", key_path=Path(str(stack["env"]["SEALTORCH_SIM_KEY"])))  # type: ignore[index]
    deadline = time.monotonic() + 30
    while True:
        with KeyReleaseClient(
            f"unix://{stack['socket']}",
            attester=attester,
            retries=0,
            trusted_release_keys=[str(stack["pin"])],
        ) as c:
            result = c.release([MODEL_ID])
        if result.keys:
            return
        assert time.monotonic() < deadline, f"still refused: {result.denied}"
        time.sleep(0.2)


def _serve_args(stack: dict[str, object], keys: str | None = None) -> list[str]:
    return [
        "serve", str(stack["sealed"]), "--keys", keys or f"unix://{stack['socket']}",
        "--keyserver-pubkey", str(stack["pin"]), "--tee", "sim", "--port", "0",
    ]  # fmt: skip


def test_a_refused_inference_server_exits_with_the_reasons_then_serves_once_allowed(
    stack: dict[str, object],
) -> None:
    refused = subprocess.run(
        [sys.executable, "-m", "sealtorch", *_serve_args(stack)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **stack["env"]},  # type: ignore[dict-item]
        check=False,
    )
    assert refused.returncode == 1, refused.stderr
    assert "ready on" not in refused.stdout
    assert "measurement_mismatch" in refused.stderr

    # The owner allows the inference server's code; the cache picks it up (SIGHUP = refresh now).
    admin: AdminClient = stack["admin"]  # type: ignore[assignment]
    admin.set_policy(MODEL_ID, _policy("keycache", "serve"))
    cache: ServiceProcess = stack["cache"]  # type: ignore[assignment]
    os.kill(cache.pid, signal.SIGHUP)  # refresh from the key server now
    _wait_until_the_cache_releases_to_serve(stack)

    start = stack["start"]
    # The model is a state dict of torch.nn:Linear: a factory this deployment allows.
    serve_args = [*_serve_args(stack), "--allow-arch", "torch.nn:Linear"]
    server: ServiceProcess = start("serve", serve_args)  # type: ignore[operator]
    url = server.wait_for(r"^listening on (\S+)", timeout=120).group(1)
    server.wait_for(r"^ready on ", timeout=120)

    x = [[0.5, -1.0, 2.0, 0.25], [1.0, 1.0, 1.0, 1.0]]
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 4], "data": x}]}
    response = httpx.post(f"{url}/v2/models/{MODEL_ID}/infer", content=json.dumps(body))
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    plain: torch.nn.Module = stack["plain"]  # type: ignore[assignment]
    with torch.inference_mode():
        expected = plain(torch.tensor(x))
    served = torch.tensor(output["data"], dtype=torch.float64).to(torch.float32)
    assert torch.equal(served.reshape(expected.shape), expected)


def _genuine_release(stack: dict[str, object]) -> ReleasedKey:
    """A real grant of the model's key: its statement and policy are what anyone who watched a
    release could capture (neither is secret; the key is, and the fake does not have it)."""
    admin: AdminClient = stack["admin"]  # type: ignore[assignment]
    admin.set_policy(MODEL_ID, _policy("keycache", "serve"))
    cache: ServiceProcess = stack["cache"]  # type: ignore[assignment]
    os.kill(cache.pid, signal.SIGHUP)
    _wait_until_the_cache_releases_to_serve(stack)
    attester = SimAttester(role="serve", key_path=Path(str(stack["env"]["SEALTORCH_SIM_KEY"])))  # type: ignore[index]
    with KeyReleaseClient(
        f"unix://{stack['socket']}", attester=attester, trusted_release_keys=[str(stack["pin"])]
    ) as client:
        return client.release([MODEL_ID]).keys[0]


@pytest.mark.parametrize(
    ("attack", "reason"),
    [
        ("no statement", "statement_missing"),
        ("a genuine statement and policy", "key_commitment_mismatch"),
        ("a genuine statement, a weaker policy", "statement_mismatch"),
    ],
)
def test_serve_refuses_a_fake_key_source_in_place_of_the_cache(
    stack: dict[str, object], tmp_path: Path, attack: str, reason: str
) -> None:
    """The host answers where serve asks for keys, with a key of its own (sealed to serve's
    HPKE key, so it opens): serve exits with the reason code before it decrypts anything."""
    genuine = _genuine_release(stack) if attack != "no statement" else None
    policy = ANYTHING_GOES
    if genuine is not None and attack == "a genuine statement and policy":
        policy = Policy.from_dict(dict(genuine.policy))

    def forge(grant: FakeGrant) -> SignedStatement | None:
        del grant
        return genuine.statement if genuine is not None else None

    key = generate_key().material
    with FakeKeySource(tmp_path / "fake.sock", key=key, forge=forge, policy=policy) as fake:
        refused = subprocess.run(
            [sys.executable, "-m", "sealtorch", *_serve_args(stack, keys=fake.url)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **stack["env"]},  # type: ignore[dict-item]
            check=False,
        )
        assert fake.keys_sent >= 1  # serve asked the fake and got its key
    assert refused.returncode == 1, refused.stderr
    assert "ready on" not in refused.stdout
    assert f"reasons: {reason}" in refused.stderr
