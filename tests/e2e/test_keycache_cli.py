"""The real processes: ``sealtorch keyserver serve`` + ``sealtorch keycache serve`` + an enclave
client on the cache's Unix socket, and ``sealtorch keycache status``.

Leases here are seconds long and the cache refreshes every second; tests wait for the cache's
reported state (polling its status endpoint), never for fixed sleeps.
"""

from __future__ import annotations

import base64
import json
import re
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from _fixtures.keyserver import (
    ServeProcess,
    init_dir,
    new_signing_key,
    release_key_of,
    sealtorch_command,
    start_serve,
)
from sealtorch.attestation import SIM_MRSIGNER, SimAttester
from sealtorch.client import AdminClient, KeyReleaseClient, read_token
from sealtorch.keys import generate_key

pytestmark = pytest.mark.e2e

_READY = re.compile(r"^ready: (\S+)(?: (\S+))? \((\d+) models?\)$")


@dataclass
class CacheProcess:
    process: subprocess.Popen[str]
    socket: Path
    metrics: str | None
    models_at_start: int
    stderr_path: Path
    lines: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def status(self) -> dict[str, Any]:
        with httpx.Client(
            base_url="http://sealtorch.local",
            transport=httpx.HTTPTransport(uds=str(self.socket)),
            timeout=10,
        ) as http:
            result: dict[str, Any] = http.get("/v1/keycache/status").json()
            return result

    def wait_status(self, predicate: Any, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            last = self.status()
            if predicate(last):
                return last
            time.sleep(0.05)
        raise AssertionError(f"the cache never reached the expected state: {last}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        finally:
            if self.process.stdout is not None:
                self.process.stdout.close()

    def logs(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def start_keycache(tmp: Path, *args: str, socket_name: str = "kc.sock") -> CacheProcess:
    socket_path = tmp / socket_name
    stderr_path = tmp / f"keycache-{time.monotonic_ns()}.log"
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen(
            sealtorch_command(
                "--log-format", "json", "-v", "keycache", "serve",
                "--socket", str(socket_path), *args,
            ),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )  # fmt: skip
    assert process.stdout is not None
    lines: list[str] = []
    metrics = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("metrics: "):
            metrics = line.split(" ", 1)[1].strip()
        match = _READY.match(line.strip())
        if match:
            assert match.group(1) == f"unix://{socket_path}"
            return CacheProcess(
                process, socket_path, metrics, int(match.group(3)), stderr_path, lines
            )
    process.kill()
    process.wait()
    raise RuntimeError(
        f"keycache serve did not start:\n{''.join(lines)}\n{stderr_path.read_text()}"
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Deployment:
    tmp: Path
    data: Path
    token: str
    app: SimAttester
    port: int
    dek: Any
    server: ServeProcess | None = None

    @property
    def ca(self) -> Path:
        return self.data / "tls" / "ca.crt"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start_server(self) -> None:
        self.server = start_serve(
            self.data,
            "--port",
            str(self.port),
            log_dir=self.tmp / "logs",
            env={"SEALTORCH_KEYSERVER_RELEASE_LEASE_SECONDS": "8"},
        )

    def stop_server(self) -> None:
        assert self.server is not None
        self.server.stop()
        self.server = None

    def admin(self) -> AdminClient:
        return AdminClient(self.url, token=self.token, ca=self.ca)

    @property
    def release_key(self) -> str:
        """The key server's release-signing public key (caches and clients pin it)."""
        return release_key_of(self.data)

    def client(self, cache: CacheProcess, **options: Any) -> KeyReleaseClient:
        """A local client of ``cache``, pinning the key server's key."""
        return KeyReleaseClient(
            cache.url, attester=self.app, trusted_release_keys=[self.release_key], **options
        )

    def cache_args(self, *extra: str) -> list[str]:
        return [
            "--keyserver", self.url, "--ca", str(self.ca), "--tee", "sim",
            "--keyserver-pubkey", self.release_key,
            "--sim-key", str(self.app.key_path), "--trust-sim-key", self.app.public_key,
            "--allow-simulated-tee-insecure", "--refresh", "1", "--backoff-max", "0.5", *extra,
        ]  # fmt: skip


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    app = SimAttester(role="app", key_path=tmp_path / "sim.key")
    data, token_file = init_dir(tmp_path, app)
    deployment = Deployment(
        tmp=tmp_path,
        data=data,
        token=read_token(token_file=token_file),
        app=app,
        port=_free_port(),
        dek=generate_key(),
    )
    deployment.start_server()
    with deployment.admin() as admin:
        admin.create_model("resnet50", key=deployment.dek)
        # Pinned by signer and product (not MRENCLAVE): the cache process measures the package
        # files when it starts, and other work may be editing them while this test runs.
        admin.set_policy(
            "resnet50",
            {"allowed_tees": ["sim"], "sim": {"mrsigner": [SIM_MRSIGNER], "isv_prod_id": 0}},
        )
    yield deployment
    if deployment.server is not None:
        deployment.server.stop()


def _forms(secret: bytes) -> list[bytes]:
    return [
        secret,
        secret.hex().encode(),
        base64.b64encode(secret).rstrip(b"="),
        base64.urlsafe_b64encode(secret).rstrip(b"="),
    ]


def test_processes_end_to_end_status_metrics_and_a_refused_cache(deployment: Deployment) -> None:
    tmp = deployment.tmp
    cache = start_keycache(
        tmp,
        *deployment.cache_args("--metrics", "127.0.0.1:0", "--persist", str(tmp / "kc.sealed")),
    )
    try:
        assert cache.models_at_start == 1
        assert stat.S_IMODE(cache.socket.stat().st_mode) == 0o600
        with deployment.client(cache, session=True) as client:
            released = client.release(["resnet50"])
            assert released.key("resnet50") == deployment.dek
            client.renew()
        status = subprocess.run(
            sealtorch_command("keycache", "status", "--socket", str(cache.socket), "--json"),
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        report = json.loads(status.stdout)
        assert report["state"] == "ready"
        assert report["models"][0]["model_id"] == "resnet50"
        assert report["keyserver"]["reachable"] is True
        assert report["simulated_tee"] is True  # opted in: the status says so too
        assert cache.metrics is not None
        metrics = httpx.get(cache.metrics, timeout=10).text
        assert "sealtorch_keycache_keys_released_total 2.0" in metrics  # release + renew
        assert "sealtorch_keycache_simulated_tee_trusted 1.0" in metrics  # opted in: said so
        assert 'sealtorch_keycache_simulated_tee_releases_total{decision="allow"} 1.0' in metrics
        metrics_base = cache.metrics.removesuffix("/metrics")
        challenge = httpx.post(f"{metrics_base}/v1/attestation/challenge", timeout=10)
        assert challenge.status_code == 404  # the metrics listener releases nothing
        over_tcp = subprocess.run(
            sealtorch_command("keycache", "status", "--url", metrics_base),
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        assert "resnet50" in over_tcp.stdout
        assert "INSECURE:       the simulated TEE is trusted" in over_tcp.stdout
        for probe in ("healthz", "readyz"):
            assert httpx.get(f"{metrics_base}/{probe}", timeout=10).json()["simulated_tee"] is True

        # A second cache whose host key the key server does not trust: it starts, says so,
        # and serves nothing.
        rogue_key = tmp / "rogue.key"
        rogue = start_keycache(
            tmp,
            "--keyserver", deployment.url, "--ca", str(deployment.ca), "--tee", "sim",
            "--keyserver-pubkey", deployment.release_key, "--sim-key", str(rogue_key),
            "--trust-sim-key", deployment.app.public_key, "--allow-simulated-tee-insecure",
            socket_name="rogue.sock",
        )  # fmt: skip
        try:
            assert rogue.models_at_start == 0
            report = rogue.status()
            assert report["state"] == "denied"
            assert report["attestation"]["reasons"] == ["attestation_key_untrusted"]
            with deployment.client(rogue) as client:
                result = client.release(["resnet50"])
            assert result.keys == ()
            assert result.denied[0].reasons == ("not_cached",)
            check = subprocess.run(
                sealtorch_command(
                    "keycache", "status", "--socket", str(rogue.socket), "--require-ready"
                ),
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert check.returncode == 3
            assert "attestation_key_untrusted" in check.stdout
        finally:
            rogue.stop()
        assert "refused this key cache's attestation" in rogue.logs()
    finally:
        assert cache.stop() == 0
    assert not cache.socket.exists()
    assert "INSECURE: local release decided on simulated-TEE evidence: allow" in cache.logs()
    # Nothing on disk or in the logs holds the key or the session token in the clear.
    haystacks = {
        "cache log": cache.logs().encode(),
        "state file": (tmp / "kc.sealed").read_bytes(),
        "status": status.stdout.encode(),
        "metrics": metrics.encode(),
    }
    token = released.session.token.encode() if released.session else b"-"
    for where, data in haystacks.items():
        assert token not in data, where
        for form in _forms(deployment.dek.material):
            assert form not in data, f"key material in the {where}"
    granted = [
        json.loads(line)
        for line in cache.logs().splitlines()
        if line.startswith("{") and "granted key version" in line
    ]
    assert granted[0]["model_id"] == "resnet50"


@pytest.mark.slow
def test_a_sim_key_without_the_opt_in_is_refused_and_with_it_warned(tmp_path: Path) -> None:
    attester = SimAttester(role="keycache", key_path=tmp_path / "sim.key")
    args = [
        "keycache", "serve", "--keyserver", "https://127.0.0.1:9", "--tee", "sim",
        "--keyserver-pubkey", new_signing_key().public_key.text,
        "--sim-key", str(attester.key_path), "--trust-sim-key", attester.public_key,
        "--socket", str(tmp_path / "kc.sock"),
    ]  # fmt: skip
    refused = subprocess.run(
        sealtorch_command(*args), capture_output=True, text=True, timeout=60, check=False
    )
    assert refused.returncode == 2
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "refusing to start" in refused.stderr
    assert "--allow-simulated-tee-insecure" in refused.stderr
    assert not (tmp_path / "kc.sock").exists()
    # With the opt-in it starts (the key server at port 9 is unreachable: it keeps retrying),
    # and says at WARNING that it trusts the sim key.
    process = subprocess.Popen(
        sealtorch_command("--log-format", "json", *args, "--allow-simulated-tee-insecure"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        records = []
        for line in process.stderr:  # until the warning; the cache then keeps running
            records.append(json.loads(line))
            if "INSECURE" in records[-1]["message"]:
                break
    finally:
        process.terminate()
        process.communicate(timeout=60)
    assert records[-1]["level"] == "warning"
    assert "simulated TEE is trusted" in records[-1]["message"]
    assert attester.public_key in records[-1]["message"]


def test_outage_lease_expiry_recovery_revocation_and_sealed_restart(
    deployment: Deployment,
) -> None:
    tmp = deployment.tmp
    args = deployment.cache_args("--persist", str(tmp / "kc.sealed"))
    cache = start_keycache(tmp, *args)
    try:
        # The key server goes away: the cache keeps serving until the 8 s lease ends.
        deployment.stop_server()
        cache.wait_status(lambda s: s["keyserver"]["reachable"] is False)
        with deployment.client(cache) as client:
            assert client.data_key("resnet50", 1) == deployment.dek
        expired = cache.wait_status(lambda s: s["state"] == "unavailable")
        assert [e["model_id"] for e in expired["expired"]] == ["resnet50"]
        with deployment.client(cache) as client:
            assert client.release(["resnet50"]).denied[0].reasons == ("lease_expired",)

        # Back: the next retry (backoff <= 0.5 s) fetches the keys again.
        deployment.start_server()
        cache.wait_status(lambda s: s["state"] == "ready")
        with deployment.client(cache) as client:
            assert client.data_key("resnet50", 1) == deployment.dek

        # Rotation and revocation reach the cache within the 1 s refresh interval.
        with deployment.admin() as admin:
            admin.rotate_key("resnet50")
            admin.revoke_key("resnet50", 1)
        cache.wait_status(lambda s: s["models"] and s["models"][0]["key_versions"] == [2])
    finally:
        assert cache.stop() == 0

    # Restart while the key server is down: the sealed state brings back the running lease.
    deployment.stop_server()
    restarted = start_keycache(tmp, *args)
    try:
        report = restarted.status()
        assert report["persistence"]["restored_keys"] == 1
        assert report["persistence"]["error"] is None
        assert [m["key_versions"] for m in report["models"]] == [[2]]
        with deployment.client(restarted) as client:
            assert client.release(["resnet50"]).keys[0].key_version == 2
    finally:
        restarted.stop()
