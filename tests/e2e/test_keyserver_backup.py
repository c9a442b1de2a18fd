"""The restore drill of docs/keyserver.md ("Backups and restore"), step by step, as written.

Back up a running SQLite key server online, lose the database, watch ``serve`` refuse to start
on nothing, restore the backup, and check that the server comes back with everything written
before the backup — and that a file sealed before the backup still opens by attested release.
Writes after the backup are gone (that is what a restore means); the audit chain verifies.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from _fixtures.keyserver import init_dir, release_key_of, sealtorch_command, start_serve
from _fixtures.postgres import PostgresCluster
from sealtorch.api import encrypt_model, load_state_dict
from sealtorch.attestation import SimAttester
from sealtorch.client import AdminClient, KeyReleaseClient, KeyServerWrapper, read_token
from sealtorch.protocol.audit import verify_chain

pytestmark = pytest.mark.e2e


def _backup(database: Path, backup: Path) -> None:
    """The documented online backup: the sqlite3 shell if present, else Python's sqlite3."""
    if shutil.which("sqlite3"):
        subprocess.run(["sqlite3", str(database), f".backup {backup}"], check=True)
    else:
        subprocess.run(
            [
                sys.executable,
                "-c",
                (
                    "import sqlite3, sys; "
                    "sqlite3.connect(sys.argv[1]).backup(sqlite3.connect(sys.argv[2]))"
                ),
                str(database),
                str(backup),
            ],
            check=True,
        )


def test_restore_drill_sqlite(tmp_path: Path) -> None:
    attester = SimAttester(role="app", key_path=tmp_path / "sim.key")
    data, token_file = init_dir(tmp_path, attester)
    token = read_token(token_file=token_file)
    ca = data / "tls" / "ca.crt"
    plain = tmp_path / "m.safetensors"
    weights = {"w": torch.arange(64, dtype=torch.float32).reshape(8, 8)}
    save_file(weights, plain)
    sealed = tmp_path / "m.sealed"
    policy = {"allowed_tees": ["sim"], "sim": {"mrenclave": [attester.mrenclave]}}

    server = start_serve(data, log_dir=tmp_path / "logs")
    try:
        with AdminClient(server.url, token=token, ca=ca) as admin:
            admin.create_model("kept")
            admin.set_policy("kept", policy)
            encrypt_model(plain, sealed, model_id="kept", key=KeyServerWrapper(admin))
            # 1. Back up while the server runs (WAL mode makes the copy consistent).
            backup = tmp_path / "backup" / "keyserver.db"
            backup.parent.mkdir()
            _backup(data / "keyserver.db", backup)
            admin.create_model("after-the-backup")
    finally:
        server.stop()

    # 2. The disaster: the database is gone. serve refuses to start on nothing.
    for name in ("keyserver.db", "keyserver.db-wal", "keyserver.db-shm"):
        (data / name).unlink(missing_ok=True)
    refused = subprocess.run(
        sealtorch_command("keyserver", "serve", str(data), "--port", "0"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 2
    assert "does not exist" in refused.stderr

    # 3. Restore: copy the backup into place (private), check it, start.
    shutil.copyfile(backup, data / "keyserver.db")
    (data / "keyserver.db").chmod(0o600)
    with sqlite3.connect(data / "keyserver.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    restored = start_serve(data, log_dir=tmp_path / "logs")
    try:
        with AdminClient(restored.url, token=token, ca=ca) as admin:
            names = {m.model_id for m in admin.list_models()}
            assert "kept" in names
            assert "after-the-backup" not in names  # written after the backup: gone
            records = list(admin.iter_audit())
            head = admin.audit_head()
        verify_chain(records, head=head)
        # 4. A file sealed before the backup still opens, by attested release.
        with KeyReleaseClient(
            restored.url, attester=attester, ca=ca, trusted_release_keys=[release_key_of(data)]
        ) as client:
            opened = load_state_dict(sealed, key=client)
        assert torch.equal(opened["w"], weights["w"])
    finally:
        restored.stop()


@pytest.mark.postgres
def test_restore_drill_postgresql(
    tmp_path: Path, postgres: str, postgres_cluster: PostgresCluster
) -> None:
    """pg_dump while the server runs, pg_restore into a new database, point database.url at
    it: the server starts on it (same instance id), and a file sealed before the dump opens."""
    attester = SimAttester(role="app", key_path=tmp_path / "sim.key")
    data, token_file = init_dir(tmp_path, attester, "--database-url", postgres)
    token = read_token(token_file=token_file)
    ca = data / "tls" / "ca.crt"
    plain = tmp_path / "m.safetensors"
    weights = {"w": torch.ones(4, 4)}
    save_file(weights, plain)
    sealed = tmp_path / "m.sealed"
    source = postgres.rsplit("/", 1)[1]
    dump = tmp_path / "keyserver.dump"
    server = start_serve(data, log_dir=tmp_path / "logs")
    try:
        with AdminClient(server.url, token=token, ca=ca) as admin:
            admin.create_model("kept")
            admin.set_policy(
                "kept", {"allowed_tees": ["sim"], "sim": {"mrenclave": [attester.mrenclave]}}
            )
            encrypt_model(plain, sealed, model_id="kept", key=KeyServerWrapper(admin))
            subprocess.run(
                [
                    str(postgres_cluster.bindir / "pg_dump"),
                    "--format=custom",
                    f"--file={dump}",
                    postgres_cluster.dsn(source),
                ],
                check=True,
                capture_output=True,
            )
            admin.create_model("after-the-backup")
    finally:
        server.stop()

    target = postgres_cluster.create_database("restored")
    try:
        subprocess.run(
            [
                str(postgres_cluster.bindir / "pg_restore"),
                f"--dbname={postgres_cluster.dsn(target)}",
                str(dump),
            ],
            check=True,
            capture_output=True,
        )
        env = {**os.environ, "SEALTORCH_KEYSERVER_DATABASE_URL": postgres_cluster.url(target)}
        restored = start_serve(data, log_dir=tmp_path / "logs", env=env)
        try:
            with AdminClient(restored.url, token=token, ca=ca) as admin:
                names = {m.model_id for m in admin.list_models()}
                records = list(admin.iter_audit())
                head = admin.audit_head()
            assert "kept" in names
            assert "after-the-backup" not in names
            verify_chain(records, head=head)
            with KeyReleaseClient(
                restored.url,
                attester=attester,
                ca=ca,
                trusted_release_keys=[release_key_of(data)],
            ) as client:
                opened = load_state_dict(sealed, key=client)
            assert torch.equal(opened["w"], weights["w"])
        finally:
            restored.stop()
    finally:
        postgres_cluster.drop_database(target)
