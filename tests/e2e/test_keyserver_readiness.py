"""Honest readiness (issue 14, item 2), on real ``keyserver serve`` processes.

Before: a full disk or a damaged database kept ``/readyz`` at 200 while every write failed, and
its 503 body showed the database host, port and driver error to anyone. Now ``/readyz`` is 503
whenever the store cannot commit and recovers by itself; the body names nothing internal; the
details go to the log and to ``GET /v1/admin/status`` (scope ``read``).

Disk full is real: the key server runs in a private mount namespace (``unshare``) with its data
directory on an 8 MiB tmpfs, and the test fills that tmpfs (through ``/proc/PID/root``). Where
unprivileged namespaces are not allowed the test is skipped, saying so.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from _fixtures.keyserver import ServeProcess, init_dir, start_serve
from _fixtures.postgres import PostgresCluster
from sealtorch._crypto.tls import client_ssl_context
from sealtorch.attestation import SimAttester
from sealtorch.client import AdminClient, read_token
from sealtorch.errors import Error, StorageCorruptError
from sealtorch.keyserver.store import open_store, sqlite_url

pytestmark = pytest.mark.e2e

_NOT_READY = {"status": "unavailable", "reason": "store_unavailable"}


def _http(server: ServeProcess, data: Path) -> httpx.Client:
    verify = client_ssl_context(ca_path=data / "tls" / "ca.crt")
    return httpx.Client(base_url=server.url, verify=verify, timeout=15)


def _eventually(check: object, *, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            assert callable(check)
            check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _assert_reveals_nothing(body: str, *secrets: str) -> None:
    lowered = body.lower()
    for word in ("psycopg", "sqlite", "operationalerror", "127.0.0.1", "5432", *secrets):
        assert word.lower() not in lowered, (word, body)


def _read_token(admin: AdminClient) -> str:
    return admin.create_token("monitoring", scopes=["read"]).token


def test_status_needs_a_read_token_and_readyz_is_ready(tmp_path: Path) -> None:
    attester = SimAttester(role="app", key_path=tmp_path / "sim.key")
    data, token_file = init_dir(tmp_path, attester)
    server = start_serve(data, log_dir=tmp_path / "logs")
    try:
        with (
            AdminClient(
                server.url, token=read_token(token_file=token_file), ca=data / "tls" / "ca.crt"
            ) as admin,
            _http(server, data) as http,
        ):
            reader = _read_token(admin)
            sealer = admin.create_token("ci", scopes=["seal"]).token
            assert http.get("/readyz").json()["status"] == "ready"
            assert http.get("/v1/admin/status").status_code == 401
            bad = http.get("/v1/admin/status", headers={"Authorization": "Bearer sta_x"})
            assert bad.status_code == 403
            wrong = http.get("/v1/admin/status", headers={"Authorization": f"Bearer {sealer}"})
            assert wrong.status_code == 403
            assert "read" in wrong.text
            ok = http.get("/v1/admin/status", headers={"Authorization": f"Bearer {reader}"})
            assert ok.status_code == 200
            assert ok.json()["store"] == {
                "backend": "sqlite",
                "ok": True,
                "problem": None,
                "detail": None,
            }
    finally:
        server.stop()


@pytest.mark.postgres
def test_database_down_turns_readyz_503_without_details_and_it_recovers(
    tmp_path: Path, postgres: str, postgres_cluster: PostgresCluster
) -> None:
    attester = SimAttester(role="app", key_path=tmp_path / "sim.key")
    data, token_file = init_dir(tmp_path, attester, "--database-url", postgres)
    database = postgres.rsplit("/", 1)[1]
    server = start_serve(data, log_dir=tmp_path / "logs")
    admin_conn = psycopg.connect(postgres_cluster.dsn("postgres"), autocommit=True)
    try:
        with _http(server, data) as http:
            assert http.get("/readyz").status_code == 200
            # The database goes away (as in a failover or an outage): no new connections, and
            # the server's current ones are cut.
            admin_conn.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
            admin_conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (database,),
            )

            def not_ready() -> None:
                answer = http.get("/readyz")
                assert answer.status_code == 503
                assert answer.json() == _NOT_READY
                _assert_reveals_nothing(answer.text, database, postgres_cluster.user)

            _eventually(not_ready)
            assert "not ready (store_unavailable)" in server.logs()
            admin_conn.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')

            def ready() -> None:
                assert http.get("/readyz").status_code == 200

            _eventually(ready)  # by itself: no restart
        with AdminClient(
            server.url, token=read_token(token_file=token_file), ca=data / "tls" / "ca.crt"
        ) as admin:
            admin.create_model("after-the-outage")
    finally:
        admin_conn.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        admin_conn.close()
        server.stop()


def test_a_damaged_page_read_at_run_time_makes_the_store_report_corruption(
    tmp_path: Path,
) -> None:
    """Store level: once a read says "malformed", the probe (readiness) says corrupt — not
    "retry later" — until the database is restored (it never heals by itself)."""
    path = tmp_path / "keyserver.db"
    store = open_store(sqlite_url(path))
    store.migrate()
    store.probe()
    store.close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        roots = [
            r for (r,) in db.execute("SELECT rootpage FROM sqlite_master WHERE tbl_name = 'models'")
        ]
    db.close()
    with open(path, "r+b") as handle:  # the table's and its index's pages (a SELECT reads one)
        for root in roots:
            handle.seek((root - 1) * page_size)
            handle.write(b"\xa5" * 16)
    store = open_store(sqlite_url(path))
    try:
        with pytest.raises(StorageCorruptError, match=r"corrupt.*backup"):
            store.list_models()
        with pytest.raises(StorageCorruptError, match="restore it from a backup"):
            store.probe()
    finally:
        store.close()


# --- disk full, for real -----------------------------------------------------------------------


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs x /mnt"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    return probe.returncode == 0


@pytest.fixture
def tmpfs_server(tmp_path: Path) -> Iterator[tuple[ServeProcess, Path, Path, Path]]:
    if not _unshare_works():
        pytest.skip("needs `unshare --user --mount` (unprivileged mount namespaces) for a tmpfs")
    attester = SimAttester(role="app", key_path=tmp_path / "sim.key")
    data, token_file = init_dir(tmp_path, attester)
    volume = tmp_path / "volume"
    volume.mkdir()
    logs = tmp_path / "serve.log"
    script = (
        f"mount -t tmpfs -o size=8m tmpfs {volume} && cp -a {data} {volume}/ks && "
        f"exec {sys.executable} -m sealtorch --log-format json -v keyserver serve "
        f"{volume}/ks --port 0"
    )
    with open(logs, "w") as stderr:
        process = subprocess.Popen(
            ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    assert process.stdout is not None
    line = process.stdout.readline()
    match = re.match(r"^listening on (\S+)$", line.strip())
    assert match, logs.read_text()
    server = ServeProcess(process, match.group(1), logs, [line], data)
    # The server's view of its volume, from outside its mount namespace.
    inside = Path(f"/proc/{process.pid}/root") / str(volume).lstrip("/")
    try:
        yield server, data, token_file, inside
    finally:
        server.stop(signal.SIGTERM)


def test_disk_full_turns_readyz_503_and_it_recovers_when_space_is_freed(
    tmpfs_server: tuple[ServeProcess, Path, Path, Path],
) -> None:
    server, data, token_file, inside = tmpfs_server
    with (
        _http(server, data) as http,
        AdminClient(
            server.url, token=read_token(token_file=token_file), ca=data / "tls" / "ca.crt"
        ) as admin,
    ):
        _eventually(lambda: _ready(http))
        reader = _read_token(admin)
        admin.create_model("before-the-disk-filled")
        filler = inside / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:  # fill the volume to the last byte
            for size in (65536, 512, 1):
                with contextlib.suppress(OSError):
                    while os.write(fd, b"\0" * size):
                        pass
        finally:
            os.close(fd)

        # Writes fail with a clear cause; readiness says not ready, and nothing internal.
        def full() -> None:
            for n in range(20):  # a few writes, so that the WAL must grow
                try:
                    admin.create_model(f"while-full-{n}-{time.monotonic_ns()}")
                except Error:
                    continue
                raise AssertionError("a write succeeded on a full disk")
            answer = http.get("/readyz")
            assert answer.status_code == 503, answer.text
            assert answer.json() == _NOT_READY
            _assert_reveals_nothing(answer.text, str(inside), "ks/keyserver.db")

        _eventually(full)
        status = http.get("/v1/admin/status", headers={"Authorization": f"Bearer {reader}"})
        assert status.status_code == 200
        assert status.json()["store"]["problem"] == "store_full"
        assert "disk is full" in status.json()["store"]["detail"]
        assert "store_full" in server.logs()

        filler.unlink()  # the operator frees space: it recovers by itself
        _eventually(lambda: _ready(http))
        admin.create_model("after-space-was-freed")
        names = {m.model_id for m in admin.list_models()}
        assert {"before-the-disk-filled", "after-space-was-freed"} <= names


def _ready(http: httpx.Client) -> None:
    assert http.get("/readyz").status_code == 200
