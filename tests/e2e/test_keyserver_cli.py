"""The real ``sealtorch keyserver init``/``serve`` processes and the ``sealtorch admin`` CLI.

Secrets (released data keys, admin and session tokens) must never appear in the database file,
the data directory, the server's logs or any response.
"""

from __future__ import annotations

import base64
import json
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from click.testing import CliRunner

from _fixtures.keyserver import (
    ServeProcess,
    init_dir,
    release_key_of,
    sealtorch_command,
    start_serve,
)
from _fixtures.softhsm import SoftHsmToken
from sealtorch._crypto.tls import client_ssl_context
from sealtorch.attestation import SimAttester
from sealtorch.cli import cli
from sealtorch.client import AdminClient, KeyReleaseClient, read_token
from sealtorch.errors import ReleaseStatementError
from sealtorch.protocol import ReleasePublicKey

pytestmark = pytest.mark.e2e


def admin_cli(server: ServeProcess, data: Path, token_file: Path, *args: str) -> Any:
    return CliRunner().invoke(
        cli,
        [
            "admin",
            "--server",
            server.url,
            "--ca",
            str(data / "tls" / "ca.crt"),
            "--token-file",
            str(token_file),
            *args,
        ],
    )


@pytest.fixture
def attester(tmp_path: Path) -> SimAttester:
    return SimAttester(role="app", key_path=tmp_path / "sim.key")


def _forms(secret: bytes) -> list[bytes]:
    return [
        secret,
        secret.hex().encode(),
        base64.b64encode(secret).rstrip(b"="),
        base64.urlsafe_b64encode(secret).rstrip(b"="),
    ]


def _scan(haystacks: dict[str, bytes], secrets: dict[str, bytes]) -> None:
    for where, data in haystacks.items():
        for name, secret in secrets.items():
            for form in _forms(secret):
                assert form not in data, f"{name} found in {where}"


def test_init_serve_admin_release_audit_and_no_secret_leaks(
    tmp_path: Path, attester: SimAttester
) -> None:
    data, token_file = init_dir(tmp_path, attester, "--name", "keys.test")
    again = CliRunner().invoke(cli, ["keyserver", "init", str(data)])
    assert again.exit_code == 2
    assert "not empty" in again.output
    assert oct((data / "master.key").stat().st_mode & 0o777) == "0o600"
    assert oct(data.stat().st_mode & 0o777) == "0o700"

    server = start_serve(data, log_dir=tmp_path / "logs")
    responses: list[bytes] = []
    try:
        assert admin_cli(server, data, token_file, "model", "create", "resnet50").exit_code == 0
        policy = tmp_path / "policy.yaml"
        policy.write_text(
            f"version: 1\nallowed_tees: [sim]\nsim:\n  mrenclave: ['{attester.mrenclave}']\n"
        )
        result = admin_cli(server, data, token_file, "policy", "set", "resnet50", str(policy))
        assert result.exit_code == 0, result.output
        listed = admin_cli(server, data, token_file, "--json", "model", "list")
        responses.append(listed.output.encode())
        assert json.loads(listed.output)[0]["policy_version"] == 1
        created = admin_cli(
            server, data, token_file, "token", "create", "--name", "ci", "--scope", "seal"
        )
        assert created.exit_code == 0
        second_token = created.output.strip().splitlines()[-1]
        assert second_token.startswith("sta_")

        with KeyReleaseClient(
            server.url,
            attester=attester,
            ca=data / "tls" / "ca.crt",
            session=True,
            trusted_release_keys=[server.release_key],
        ) as client:
            released = client.release(["resnet50"])
            dek = released.keys[0].key
            assert released.session is not None
            session_token = released.session.token
            client.renew()
        with KeyReleaseClient(
            server.url,
            attester=attester,
            ca=data / "tls" / "ca.crt",
            trusted_release_keys=[server.release_key],
        ) as c:
            denied = c.release(["ghost"])
            assert denied.denied[0].reasons == ("unknown_model",)

        verify = admin_cli(server, data, token_file, "audit", "verify")
        assert verify.exit_code == 0, verify.output
        head = verify.output.strip().rsplit(" ", 1)[-1]
        export = tmp_path / "audit.jsonl"
        assert (
            admin_cli(server, data, token_file, "audit", "export", "-o", str(export)).exit_code == 0
        )
        responses.append(export.read_bytes())
        offline = admin_cli(
            server, data, token_file, "audit", "verify", "--file", str(export),
            "--expected-head", head,
        )  # fmt: skip
        assert offline.exit_code == 0, offline.output
        unauthenticated = CliRunner().invoke(
            cli, ["admin", "--server", server.url, "--ca", str(data / "tls" / "ca.crt"),
                  "model", "list"],
            env={"SEALTORCH_ADMIN_TOKEN": "sta_0123456789abcdef." + "A" * 43},
        )  # fmt: skip
        assert unauthenticated.exit_code == 1
        assert "wrong, revoked or expired" in unauthenticated.output
    finally:
        assert server.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    logs = server.logs()
    assert "key server ready" in logs
    assert "shutdown complete" in logs  # graceful
    assert all(json.loads(line) for line in logs.splitlines() if line.startswith("{"))

    admin_token = read_token(token_file=token_file)
    haystacks = {"logs": logs.encode(), **{f"response{i}": r for i, r in enumerate(responses)}}
    for path in data.rglob("*"):
        if path.is_file():
            haystacks[str(path.relative_to(data))] = path.read_bytes()
    _scan(
        haystacks,
        {
            "data key": dek.material,
            "admin token": admin_token.encode(),
            "admin token secret": base64.urlsafe_b64decode(admin_token.split(".")[1] + "="),
            "second admin token": second_token.encode(),
            "session token": session_token.encode(),
        },
    )

    # Deleted and reordered records are detected in an export (offline) ...
    lines = export.read_text().splitlines(keepends=True)
    for name, edited in {
        "deleted": lines[:2] + lines[3:],
        "reordered": [lines[0], lines[2], lines[1], *lines[3:]],
        "truncated": lines[:-1],
    }.items():
        copy = tmp_path / f"{name}.jsonl"
        copy.write_text("".join(edited))
        checked = CliRunner().invoke(
            cli, ["admin", "--server", "https://unused", "audit", "verify", "--file", str(copy),
                  "--expected-head", head],
        )  # fmt: skip
        assert checked.exit_code == 1, name
    # ... and an edited record in the live log, by someone with write access to the database.
    with sqlite3.connect(data / "keyserver.db") as db:
        db.execute("DROP TRIGGER audit_log_no_update")
        db.execute(
            "UPDATE audit_log SET decision = 'allow' WHERE action = 'release' AND decision = 'deny'"
        )
    server = start_serve(data, log_dir=tmp_path / "logs")
    try:
        tampered = admin_cli(server, data, token_file, "audit", "verify")
        assert tampered.exit_code == 1
        assert "was modified after it was written" in tampered.output
    finally:
        server.stop()


def test_pkcs11_master_key_end_to_end(
    tmp_path: Path, attester: SimAttester, softhsm_token: SoftHsmToken
) -> None:
    env = {**softhsm_token.environ(), "SEALTORCH_PKCS11_PIN": softhsm_token.user_pin}
    key_label = softhsm_token.new_key_label("ks-master")
    data = tmp_path / "ks"
    token_file = tmp_path / "admin.token"
    result = subprocess.run(
        sealtorch_command(
            "keyserver", "init", str(data), "--trust-sim-key", attester.public_key,
            "--admin-token-file", str(token_file), "--pkcs11-module", softhsm_token.module,
            "--token-label", softhsm_token.token_label, "--key-label", key_label,
        ),
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert not (data / "master.key").exists()
    assert not (data / "release-signing.key").exists()  # the signing key is in the token too
    assert release_key_of(data) in result.stdout
    assert "pkcs11" in (data / "keyserver.toml").read_text()
    shown = subprocess.run(
        sealtorch_command("keyserver", "signing-key", "show", str(data)),
        capture_output=True, text=True, timeout=60, env=env, check=True,
    )  # fmt: skip
    assert shown.stdout.strip() == release_key_of(data)
    no_pin = {k: v for k, v in env.items() if k != "SEALTORCH_PKCS11_PIN"}
    failed = subprocess.run(
        sealtorch_command("keyserver", "serve", str(data), "--port", "0"),
        capture_output=True, text=True, timeout=60, env=no_pin, check=False,
    )  # fmt: skip
    assert failed.returncode == 2
    assert "SEALTORCH_PKCS11_PIN" in failed.stderr
    assert softhsm_token.user_pin not in failed.stderr

    server = start_serve(data, log_dir=tmp_path / "logs", env=env)
    try:
        ca = data / "tls" / "ca.crt"
        with AdminClient(server.url, token=read_token(token_file=token_file), ca=ca) as admin:
            admin.create_model("m")
            admin.set_policy(
                "m", {"allowed_tees": ["sim"], "sim": {"mrenclave": [attester.mrenclave]}}
            )
            admin.rotate_key("m")
        with KeyReleaseClient(
            server.url, attester=attester, ca=ca, trusted_release_keys=[server.release_key]
        ) as client:
            keys = client.release(["m"]).keys
            assert [k.key_version for k in keys] == [1, 2]
            assert keys[0].key != keys[1].key
    finally:
        server.stop()
    logs = server.logs()
    assert softhsm_token.user_pin not in logs
    with sqlite3.connect(data / "keyserver.db") as db:
        blobs = [bytes(row[0]) for row in db.execute("SELECT wrapped_dek FROM key_versions")]
    assert [blob[0] for blob in blobs] == [0x02, 0x02]  # wrapped inside the token
    with sqlite3.connect(data / "keyserver.db") as db:
        [(nonce_key,)] = db.execute("SELECT nonce_key FROM store_identity").fetchall()
    assert bytes(nonce_key)[0] == 0x02  # the challenge-nonce key too
    _scan({"db": (data / "keyserver.db").read_bytes(), "logs": logs.encode()},
          {"v1": keys[0].key.material, "v2": keys[1].key.material})  # fmt: skip


def _workers(server: ServeProcess) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(server.process.pid).children():
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:  # exited (a zombie until its parent reaps it)
            continue
    return found


def _listening(worker: psutil.Process, port: int) -> bool:
    # psutil 6 renamed connections() to net_connections(); the kserve SDK (dev extra) pins
    # psutil<6, so take whichever this psutil has.
    connections = getattr(worker, "net_connections", None) or worker.connections
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in connections("tcp"))


def test_workers_listen_on_one_port_restart_and_aggregate_metrics(
    tmp_path: Path, attester: SimAttester
) -> None:
    data, token_file = init_dir(tmp_path, attester)
    server = start_serve(data, "--workers", "2", log_dir=tmp_path / "logs")
    ca = data / "tls" / "ca.crt"
    verify = client_ssl_context(ca_path=ca)
    port = int(server.url.rsplit(":", 1)[1])
    try:
        with AdminClient(server.url, token=read_token(token_file=token_file), ca=ca) as admin:
            admin.create_model("m")
            admin.set_policy(
                "m", {"allowed_tees": ["sim"], "sim": {"mrenclave": [attester.mrenclave]}}
            )
        workers = _workers(server)
        assert len(workers) == 2
        assert all(_listening(w, port) for w in workers)  # each its own socket (SO_REUSEPORT)
        assert not _listening(psutil.Process(server.process.pid), port)  # the parent only binds
        for _ in range(6):  # new connections: spread over both workers
            with KeyReleaseClient(
                server.url, attester=attester, ca=ca, trusted_release_keys=[server.release_key]
            ) as client:
                assert client.release(["m"]).keys
        metrics = httpx.get(f"{server.url}/metrics", verify=verify, timeout=10).text
        assert "sealtorch_keyserver_keys_released_total 6.0" in metrics

        workers[0].kill()  # a crashed worker is replaced; the other keeps serving
        deadline = time.monotonic() + 60
        while True:
            current = _workers(server)
            replaced = len(current) == 2 and workers[0].pid not in {w.pid for w in current}
            if replaced and all(_listening(w, port) for w in current):
                break
            assert time.monotonic() < deadline, "the killed worker was not replaced"
            time.sleep(0.1)
        for _ in range(4):
            with KeyReleaseClient(
                server.url, attester=attester, ca=ca, trusted_release_keys=[server.release_key]
            ) as client:
                assert client.release(["m"]).keys
    finally:
        assert server.stop() in (0, -signal.SIGTERM)
    logs = server.logs()
    started = [line for line in logs.splitlines() if "] serving" in line]
    assert len(started) == 3  # two workers and the replacement, JSON-logging like the parent
    assert all(json.loads(line)["level"] == "info" for line in started)
    assert "starting another" in logs
    assert logs.count("shutdown complete") == 2  # graceful on SIGTERM


def test_workers_stop_when_the_supervisor_is_killed(tmp_path: Path, attester: SimAttester) -> None:
    # SIGKILL gives the supervisor no chance to stop its workers: they must notice on their own,
    # or orphans would keep serving on the port (with what may be an old configuration).
    data, _ = init_dir(tmp_path, attester)
    server = start_serve(data, "--workers", "2", log_dir=tmp_path / "logs")
    port = int(server.url.rsplit(":", 1)[1])
    deadline = time.monotonic() + 60
    while len(workers := _workers(server)) < 2 or not all(_listening(w, port) for w in workers):
        assert time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.1)
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"orphaned workers still running: {[w.pid for w in alive]}"
    logs = server.logs()
    assert logs.count("supervisor") == 2  # each worker says why it stopped...
    assert logs.count("shutdown complete") == 2  # ... and stopped gracefully
    with socket.socket() as probe:  # nobody holds the port any more
        probe.bind(("127.0.0.1", port))


def test_a_worker_that_cannot_start_stops_the_server(tmp_path: Path) -> None:
    from _fixtures.workers import serve_nothing
    from sealtorch._listen import listen_tcp
    from sealtorch.errors import ConfigError
    from sealtorch.keyserver._workers import WorkerSpec, run_workers

    holder = listen_tcp("127.0.0.1", 0, reuse_port=True, listen=False)
    try:
        spec = WorkerSpec(
            serve=serve_nothing,
            address=holder.getsockname()[:2],
        )
        with pytest.raises(ConfigError, match="could not start"):
            run_workers(spec, count=2, grace=1.0)
    finally:
        holder.close()


def test_release_signing_key_rollover(tmp_path: Path, attester: SimAttester) -> None:
    """docs/keyserver.md's rollover with the real commands: create a new key, pin old and new,
    switch the server, unpin the old one."""
    data, token_file = init_dir(tmp_path, attester)
    old = release_key_of(data)
    created = subprocess.run(
        sealtorch_command(
            "keyserver", "signing-key", "create", str(data),
            "--path", str(data / "release-signing-2.key"),
        ),
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    new = created.stdout.strip()
    ca = data / "tls" / "ca.crt"
    policy = {"allowed_tees": ["sim"], "sim": {"mrenclave": [attester.mrenclave]}}

    def key_with(server: ServeProcess, pins: list[str]) -> Any:
        with KeyReleaseClient(
            server.url, attester=attester, ca=ca, trusted_release_keys=pins
        ) as client:
            return client.data_key("m", 1)

    server = start_serve(data, log_dir=tmp_path / "logs")
    try:
        with AdminClient(server.url, token=read_token(token_file=token_file), ca=ca) as admin:
            admin.create_model("m")
            admin.set_policy("m", policy)
        dek = key_with(server, [old, new])  # enclaves redeployed with both pins
        with pytest.raises(ReleaseStatementError) as caught:
            key_with(server, [new])
        assert caught.value.reason == "statement_unpinned_key"
    finally:
        server.stop()
    config = data / "keyserver.toml"
    config.write_text(
        config.read_text().replace('path = "release-signing.key"', 'path = "release-signing-2.key"')
    )
    server = start_serve(data, log_dir=tmp_path / "logs")
    try:
        assert key_with(server, [old, new]) == dek  # switched: still accepted
        assert key_with(server, [new]) == dek  # old unpinned
        with pytest.raises(ReleaseStatementError) as caught:
            key_with(server, [old])
        assert caught.value.reason == "statement_unpinned_key"
    finally:
        server.stop()
    assert ReleasePublicKey.parse(new).key_id in server.logs()  # "signed with key ..." at start
