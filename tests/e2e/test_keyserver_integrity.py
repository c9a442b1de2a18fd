"""``keyserver serve`` never starts on the wrong data (issue 14, item 1).

Before: a missing or 0-byte ``keyserver.db`` was silently recreated (``/readyz`` ready, every
model, key, token and audit record "gone"), and corrupt pages went unnoticed until admin calls
failed with "retry later". Now only ``keyserver init`` creates a store, and ``serve`` refuses a
missing, empty, uninitialised, damaged or foreign database with one line saying what to check,
before it opens a socket.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from _fixtures.keyserver import init_dir, sealtorch_command, start_serve
from sealtorch.attestation import SimAttester
from sealtorch.client import AdminClient, read_token

pytestmark = pytest.mark.e2e


def _serve_refused(data: Path, *extra: str, env: dict[str, str] | None = None) -> str:
    """Run ``serve`` and expect a refusal: exit status 2 or 1, one line on stderr, no URL."""
    result = subprocess.run(
        sealtorch_command("keyserver", "serve", str(data), "--port", "0", *extra),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert result.returncode in (1, 2), result.stderr
    assert "listening on" not in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture
def initialised(tmp_path: Path) -> tuple[Path, Path, SimAttester]:
    attester = SimAttester(role="app", key_path=tmp_path / "sim.key")
    data, token_file = init_dir(tmp_path, attester)
    return data, token_file, attester


def test_init_records_the_store_instance_id(initialised: tuple[Path, Path, SimAttester]) -> None:
    data, _, _ = initialised
    instance = (data / "instance-id").read_text().strip()
    assert len(instance) == 32
    assert int(instance, 16) >= 0
    with sqlite3.connect(data / "keyserver.db") as db:
        assert db.execute("SELECT instance_id FROM store_identity").fetchone()[0] == instance


def test_a_missing_database_is_refused_not_recreated(
    initialised: tuple[Path, Path, SimAttester],
) -> None:
    data, _, _ = initialised
    (data / "keyserver.db").unlink()
    line = _serve_refused(data)
    assert "keyserver.db does not exist" in line
    assert "mounted" in line
    assert "keyserver init" in line
    assert not (data / "keyserver.db").exists()  # nothing was created


def test_an_empty_database_file_is_refused(initialised: tuple[Path, Path, SimAttester]) -> None:
    data, _, _ = initialised
    for sidecar in ("keyserver.db-wal", "keyserver.db-shm"):
        (data / sidecar).unlink(missing_ok=True)
    (data / "keyserver.db").write_bytes(b"")
    line = _serve_refused(data)
    assert "is empty (0 bytes)" in line
    assert "mounted" in line
    assert (data / "keyserver.db").stat().st_size == 0  # left as it was


def test_a_foreign_database_is_refused(tmp_path: Path) -> None:
    attester = SimAttester(role="app", key_path=tmp_path / "sim.key")
    ours, _ = init_dir(tmp_path / "a", attester)
    theirs, _ = init_dir(tmp_path / "b", attester)
    shutil.copyfile(theirs / "keyserver.db", ours / "keyserver.db")
    line = _serve_refused(ours)
    assert "belongs to another key server" in line
    assert (theirs / "instance-id").read_text().strip() in line
    assert "database_url" in line


def test_a_non_sqlite_file_is_reported_as_corrupt(
    initialised: tuple[Path, Path, SimAttester],
) -> None:
    data, _, _ = initialised
    (data / "keyserver.db").write_bytes(b"this is not a database" * 400)
    line = _serve_refused(data)
    assert "corrupt" in line
    assert "backup" in line
    assert "retry later" not in line


def test_damaged_pages_are_found_by_quick_check_at_start(
    initialised: tuple[Path, Path, SimAttester],
) -> None:
    data, token_file, _ = initialised
    server = start_serve(data, log_dir=data.parent / "logs")
    try:
        with AdminClient(
            server.url, token=read_token(token_file=token_file), ca=data / "tls" / "ca.crt"
        ) as admin:
            for n in range(40):
                admin.create_model(f"model-{n}")
    finally:
        server.stop()
    database = data / "keyserver.db"
    with sqlite3.connect(database) as db:  # fold the WAL into the file
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        [root] = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'models'").fetchone()
    # A failing disk's (or an attacker's) edit: garbage over the header of the models table's
    # page. The schema still reads, so only an integrity check finds it before a client does.
    with open(database, "r+b") as handle:
        handle.seek((root - 1) * page_size)
        handle.write(b"\xa5" * 16)
    line = _serve_refused(data)
    assert "corrupt" in line
    assert "integrity" in line
    assert "backup" in line


def test_a_data_dir_from_before_instance_ids_adopts_its_store(
    initialised: tuple[Path, Path, SimAttester],
) -> None:
    data, _, _ = initialised
    recorded = (data / "instance-id").read_text()
    (data / "instance-id").unlink()
    server = start_serve(data, log_dir=data.parent / "logs")
    server.stop()
    assert (data / "instance-id").read_text() == recorded
    assert "had no instance id" in server.logs()


@pytest.mark.postgres
def test_an_uninitialised_postgresql_database_is_refused(tmp_path: Path, postgres: str) -> None:
    attester = SimAttester(role="app", key_path=tmp_path / "sim.key")
    data, _ = init_dir(tmp_path, attester)
    # The configured database is an empty one (e.g. a fresh cluster after a failed restore).
    line = _serve_refused(data, env={**os.environ, "SEALTORCH_KEYSERVER_DATABASE_URL": postgres})
    assert "holds no key server" in line
    assert "never initialised" in line
    assert "password" not in line.lower() or "***" in line
