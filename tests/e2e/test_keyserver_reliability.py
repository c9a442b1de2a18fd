"""Crash safety and replicas: ``kill -9`` under load, and several servers on one PostgreSQL.

After a hard kill, every model and key whose creation or release the server acknowledged must
be present and usable after a restart, and the audit chain must verify. Replicas must consume
each nonce exactly once between them.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from _fixtures.keyserver import ServeProcess, init_dir, release_key_of, start_serve
from sealtorch._crypto import hpke
from sealtorch._crypto.tls import client_ssl_context
from sealtorch.attestation import SimAttester, report_data_for
from sealtorch.client import AdminClient, KeyReleaseClient, read_token
from sealtorch.errors import Error
from sealtorch.protocol import b64decode, b64encode
from sealtorch.protocol.audit import verify_chain

pytestmark = pytest.mark.e2e


@dataclass
class Acknowledged:
    models: set[str] = field(default_factory=set)
    keys: dict[tuple[str, int], str] = field(default_factory=dict)  # -> fingerprint
    request_ids: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _policy(attester: SimAttester) -> dict[str, object]:
    return {"allowed_tees": ["sim"], "sim": {"mrenclave": [attester.mrenclave]}}


def _load(
    servers: list[ServeProcess],
    data: Path,
    token: str,
    attester: SimAttester,
    done: Acknowledged,
    stop: threading.Event,
    worker: int,
) -> None:
    ca = data / "tls" / "ca.crt"
    url = servers[worker % len(servers)].url
    try:
        with (
            AdminClient(url, token=token, ca=ca, timeout=10) as admin,
            KeyReleaseClient(
                url,
                attester=attester,
                ca=ca,
                retries=0,
                timeout=10,
                trusted_release_keys=[release_key_of(data)],
            ) as client,
        ):
            for i in range(10_000):
                if stop.is_set():
                    return
                model_id = f"m{worker}-{i}"
                admin.create_model(model_id)
                admin.set_policy(model_id, _policy(attester))
                with done.lock:
                    done.models.add(model_id)
                result = client.release([model_id])
                with done.lock:
                    done.request_ids.add(result.request_id)
                    for released in result.keys:
                        done.keys[(released.model_id, released.key_version)] = (
                            released.key.fingerprint
                        )
    except (Error, httpx.TransportError):
        return  # the server was killed


def _run_and_kill(
    servers: list[ServeProcess], data: Path, token: str, attester: SimAttester, seconds: float
) -> Acknowledged:
    done = Acknowledged()
    stop = threading.Event()
    threads = [
        threading.Thread(target=_load, args=(servers, data, token, attester, done, stop, n))
        for n in range(4)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(done.keys) < 20:
        time.sleep(0.05)
    time.sleep(seconds)
    for server in servers:
        server.stop(signal.SIGKILL)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    assert len(done.keys) >= 20, "the load did not get going"
    return done


def _check_after_restart(
    server: ServeProcess, data: Path, token: str, attester: SimAttester, done: Acknowledged
) -> None:
    ca = data / "tls" / "ca.crt"
    with AdminClient(server.url, token=token, ca=ca) as admin:
        present = {m.model_id for m in admin.list_models()}
        assert done.models <= present
        records = list(admin.iter_audit())
        head = admin.audit_head()
    summary = verify_chain([r for r in records if r.seq <= head.seq], head=head)
    assert summary.count >= len(done.models)
    assert done.request_ids <= {r.request_id for r in records}
    with KeyReleaseClient(
        server.url, attester=attester, ca=ca, trusted_release_keys=[server.release_key]
    ) as client:
        result = client.release(sorted(done.models))
        released = {(k.model_id, k.key_version): k.key.fingerprint for k in result.keys}
    assert result.denied == ()
    for pair, fingerprint in done.keys.items():
        assert released[pair] == fingerprint


@pytest.mark.slow
def test_kill_9_under_load_keeps_every_acknowledged_model_and_key(tmp_path: Path) -> None:
    attester = SimAttester(role="app", key_path=tmp_path / "sim.key")
    data, token_file = init_dir(tmp_path, attester)
    token = read_token(token_file=token_file)
    server = start_serve(data, log_dir=tmp_path / "logs")
    done = _run_and_kill([server], data, token, attester, seconds=0.7)
    restarted = start_serve(data, log_dir=tmp_path / "logs")
    try:
        _check_after_restart(restarted, data, token, attester, done)
    finally:
        restarted.stop()


@pytest.mark.slow
@pytest.mark.postgres
def test_kill_9_two_replicas_on_postgresql(tmp_path: Path, postgres: str) -> None:
    attester = SimAttester(role="app", key_path=tmp_path / "sim.key")
    data, token_file = init_dir(tmp_path, attester, "--database-url", postgres)
    token = read_token(token_file=token_file)
    replicas = [start_serve(data, log_dir=tmp_path / "logs") for _ in range(2)]
    done = _run_and_kill(replicas, data, token, attester, seconds=0.7)
    restarted = start_serve(data, log_dir=tmp_path / "logs")
    try:
        _check_after_restart(restarted, data, token, attester, done)
    finally:
        restarted.stop()


@pytest.mark.postgres
def test_a_nonce_is_consumed_once_across_replicas(tmp_path: Path, postgres: str) -> None:
    """Challenges write nothing (their nonces carry a MAC under the store's nonce key), so a
    nonce issued by one replica must open at another - once: a replay at either is refused."""
    attester = SimAttester(role="app", key_path=tmp_path / "sim.key")
    data, token_file = init_dir(tmp_path, attester, "--database-url", postgres)
    first, second = (start_serve(data, log_dir=tmp_path / "logs") for _ in range(2))
    ca = data / "tls" / "ca.crt"
    try:
        with AdminClient(first.url, token=read_token(token_file=token_file), ca=ca) as admin:
            admin.create_model("m")
            admin.set_policy("m", _policy(attester))
        verify = client_ssl_context(ca_path=ca)
        with httpx.Client(verify=verify) as http:
            nonce = b64decode(
                http.post(f"{first.url}/v1/attestation/challenge", json={}).json()["nonce"]
            )
            suite = hpke.DEFAULT_SUITE
            public = hpke.generate_private_key(suite).public_key().encode()
            evidence = attester.evidence(
                report_data_for(nonce=nonce, hpke_suite=suite, public_key=public)
            )
            request = {
                "nonce": b64encode(nonce),
                "evidence": evidence.to_wire(),
                "hpke": {"suite": suite, "public_key": b64encode(public)},
                "models": ["m"],
            }
            used = http.post(f"{second.url}/v1/keys/release", json=request)
            assert used.status_code == 200  # issued by one replica, consumed at the other
            for replica in (first, second):
                replay = http.post(f"{replica.url}/v1/keys/release", json=request)
                assert replay.status_code == 403
                assert replay.json()["error"]["code"] == "nonce_invalid"
    finally:
        first.stop()
        second.stop()
