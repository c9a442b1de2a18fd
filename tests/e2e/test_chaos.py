"""Chaos (issue 14, item 6): ``kill -9`` the key server a few times during mixed load, restart.

Each round starts ``keyserver serve``, runs four clients doing admin writes (create a model,
set its policy, rotate a key), sealing (the server wraps each file's content key) and attested
releases, and kills the server with SIGKILL in the middle. After the last round a fresh server
must hold every write it acknowledged (models, policies, key versions, released keys with the
same fingerprints, audit records of every acknowledged release, one verifying audit chain), and
every file sealed in any round must still open through a fresh attested release — on SQLite
and on PostgreSQL.

Run it alone with ``.venv/bin/python -m pytest -m chaos -n 2``; it is part of
``make test`` (about 40 s for both databases).
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file

from _fixtures.keyserver import ServeProcess, init_dir, release_key_of, start_serve
from sealtorch.api import encrypt_model, load_state_dict
from sealtorch.attestation import SimAttester
from sealtorch.client import AdminClient, KeyReleaseClient, KeyServerWrapper, read_token
from sealtorch.errors import Error
from sealtorch.protocol.audit import verify_chain

pytestmark = [pytest.mark.chaos, pytest.mark.e2e]

_ROUNDS = 3
_CLIENTS = 4


@dataclass
class _Acknowledged:
    """Every write the server acknowledged, across rounds."""

    models: set[str] = field(default_factory=set)
    policies: set[str] = field(default_factory=set)
    versions: dict[str, int] = field(default_factory=dict)  # model -> highest acked version
    keys: dict[tuple[str, int], str] = field(default_factory=dict)  # -> fingerprint
    request_ids: set[str] = field(default_factory=set)
    sealed: dict[Path, str] = field(default_factory=dict)  # file -> model
    lock: threading.Lock = field(default_factory=threading.Lock)


def _policy(attester: SimAttester) -> dict[str, object]:
    return {"allowed_tees": ["sim"], "sim": {"mrenclave": [attester.mrenclave]}}


def _weights(model_id: str) -> dict[str, torch.Tensor]:
    return {"w": torch.full((8, 8), float(sum(model_id.encode())))}


def _client_load(
    server: ServeProcess,
    data: Path,
    token: str,
    attester: SimAttester,
    acked: _Acknowledged,
    stop: threading.Event,
    name: str,
    work: Path,
) -> None:
    ca = data / "tls" / "ca.crt"
    plain = work / f"{name}.safetensors"
    try:
        with (
            AdminClient(server.url, token=token, ca=ca, timeout=10) as admin,
            KeyReleaseClient(
                server.url,
                attester=attester,
                ca=ca,
                retries=0,
                timeout=10,
                remember=False,
                trusted_release_keys=[release_key_of(data)],
            ) as client,
        ):
            for i in range(10_000):
                if stop.is_set():
                    return
                model_id = f"{name}-{i}"
                admin.create_model(model_id)
                with acked.lock:
                    acked.models.add(model_id)
                    acked.versions[model_id] = 1
                admin.set_policy(model_id, _policy(attester))
                with acked.lock:
                    acked.policies.add(model_id)
                if i % 3 == 2:
                    rotated = admin.rotate_key(model_id)
                    with acked.lock:
                        acked.versions[model_id] = rotated.version
                save_file(_weights(model_id), plain)
                sealed = work / f"{model_id}.sealed"
                encrypt_model(plain, sealed, model_id=model_id, key=KeyServerWrapper(admin))
                with acked.lock:
                    acked.sealed[sealed] = model_id
                result = client.release([model_id])
                with acked.lock:
                    acked.request_ids.add(result.request_id)
                    for released in result.keys:
                        acked.keys[(released.model_id, released.key_version)] = (
                            released.key.fingerprint
                        )
    except (Error, httpx.TransportError, OSError):
        return  # the server was killed mid-request: that write was never acknowledged


def _round(
    data: Path, token: str, attester: SimAttester, acked: _Acknowledged, number: int, tmp: Path
) -> None:
    server = start_serve(data, log_dir=tmp / "logs")
    work = tmp / "sealed"
    work.mkdir(exist_ok=True)
    stop = threading.Event()
    before = len(acked.request_ids)
    threads = [
        threading.Thread(
            target=_client_load,
            args=(server, data, token, attester, acked, stop, f"r{number}c{n}", work),
        )
        for n in range(_CLIENTS)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(acked.request_ids) < before + 8:
        time.sleep(0.02)
    time.sleep(0.3)
    server.stop(signal.SIGKILL)  # in the middle of the load
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    assert len(acked.request_ids) >= before + 8, "the load did not get going"


def _verify(data: Path, token: str, attester: SimAttester, acked: _Acknowledged, tmp: Path) -> None:
    server = start_serve(data, log_dir=tmp / "logs")
    ca = data / "tls" / "ca.crt"
    try:
        with AdminClient(server.url, token=token, ca=ca) as admin:
            assert acked.models <= {m.model_id for m in admin.list_models()}
            for model_id in acked.policies:
                assert admin.show_policy(model_id) is not None
            for model_id, version in acked.versions.items():
                versions = {k.version for k in admin.list_keys(model_id)}
                assert set(range(1, version + 1)) <= versions
            records = list(admin.iter_audit())
            head = admin.audit_head()
        verify_chain([r for r in records if r.seq <= head.seq], head=head)
        assert acked.request_ids <= {r.request_id for r in records}
        with KeyReleaseClient(
            server.url, attester=attester, ca=ca, trusted_release_keys=[server.release_key]
        ) as client:
            result = client.release(sorted(acked.policies))  # the others never got one
            assert result.denied == ()
            released = {(k.model_id, k.key_version): k.key.fingerprint for k in result.keys}
            for pair, fingerprint in acked.keys.items():
                assert released[pair] == fingerprint
            for sealed, model_id in sorted(acked.sealed.items()):  # every sealed file opens
                opened = load_state_dict(sealed, key=client)
                assert torch.equal(opened["w"], _weights(model_id)["w"])
    finally:
        server.stop()


def _chaos(tmp: Path, *init_args: str) -> None:
    attester = SimAttester(role="app", key_path=tmp / "sim.key")
    data, token_file = init_dir(tmp, attester, *init_args)
    token = read_token(token_file=token_file)
    acked = _Acknowledged()
    for number in range(_ROUNDS):
        _round(data, token, attester, acked, number, tmp)
    assert len(acked.sealed) >= _ROUNDS
    _verify(data, token, attester, acked, tmp)


def test_kill_9_under_mixed_load_loses_nothing_acknowledged_sqlite(tmp_path: Path) -> None:
    _chaos(tmp_path)


@pytest.mark.postgres
def test_kill_9_under_mixed_load_loses_nothing_acknowledged_postgresql(
    tmp_path: Path, postgres: str
) -> None:
    _chaos(tmp_path, "--database-url", postgres)
