"""A private PostgreSQL cluster for the test session, and a fresh database per test.

``postgres_cluster`` (session scope) runs ``initdb`` into a new temp directory and starts the
server on ``127.0.0.1`` at a free port (plus a Unix socket in the temp dir), with durability
switched off for speed (``fsync=off``: test data need not survive a power cut). As root it runs
the server as the ``postgres`` OS user through ``runuser``, since PostgreSQL refuses to run as
root. Under pytest-xdist every worker starts its own cluster (about a second, in parallel), so
workers never share state. The cluster is stopped and deleted at the end of the session.

``postgres`` (function scope) creates an empty database for one test, yields its SQLAlchemy URL
(``postgresql+psycopg://...``) and drops it afterwards (``WITH (FORCE)``), so tests are isolated
without re-running ``initdb``.

The superuser has a random password; host connections use scram-sha-256, so other local users
cannot reach the test cluster.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

MISSING = (
    "PostgreSQL server binaries were not found ({what}). The key server tests run against a real "
    "PostgreSQL: run `make test` (it installs the system packages), or "
    "`apt-get install postgresql`. Set SEALTORCH_PG_BINDIR to use binaries elsewhere."
)


def find_bindir() -> Path:
    configured = os.environ.get("SEALTORCH_PG_BINDIR")
    if configured:
        path = Path(configured)
        if (path / "initdb").is_file():
            return path
        pytest.fail(MISSING.format(what=f"no initdb in SEALTORCH_PG_BINDIR={configured}"))
    candidates = []
    for initdb in Path("/usr/lib/postgresql").glob("*/bin/initdb"):
        version = initdb.parent.parent.name
        if version.isdigit():
            candidates.append((int(version), initdb.parent))
    if candidates:
        return max(candidates)[1]
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    pytest.fail(MISSING.format(what="/usr/lib/postgresql/*/bin/initdb"), pytrace=False)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class PostgresCluster:
    """A running private cluster; :meth:`url` gives SQLAlchemy URLs for its databases."""

    user = "postgres"

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.password = secrets.token_hex(16)
        self.base = Path(tempfile.mkdtemp(prefix="sealtorch-pg-"))
        self.data = self.base / "data"
        self.sockets = self.base / "sockets"
        self.log = self.base / "server.log"
        self.port = 0
        self._as_postgres = os.geteuid() == 0
        self._admin: psycopg.Connection[tuple[object, ...]] | None = None

    # -- process control --

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = list(args)
        if self._as_postgres:
            runuser = shutil.which("runuser")
            if runuser is None:
                pytest.fail("running as root needs `runuser` (util-linux) to start PostgreSQL")
            command = [runuser, "-u", "postgres", "--", *command]
        return subprocess.run(
            command, check=check, capture_output=True, text=True, timeout=120, cwd=self.base
        )

    def start(self) -> None:
        self.sockets.mkdir()
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._as_postgres:
            uid, gid = _postgres_ids()
            for path in (self.base, self.sockets, pwfile):
                os.chown(path, uid, gid)
        self.base.chmod(0o700)
        try:
            self._run(
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                self.user,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                f"--pwfile={pwfile}",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            )
        except subprocess.CalledProcessError as exc:
            pytest.fail(f"initdb failed:\n{exc.stdout}\n{exc.stderr}")
        pwfile.unlink()
        last_error = ""
        for _ in range(5):
            self.port = _free_port()
            options = " ".join(
                [
                    "-c listen_addresses=127.0.0.1",
                    f"-c port={self.port}",
                    f"-c unix_socket_directories={self.sockets}",
                    "-c fsync=off",
                    "-c synchronous_commit=off",
                    "-c full_page_writes=off",
                    "-c shared_buffers=32MB",
                    "-c max_connections=200",
                ]
            )
            result = self._run(
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-w",
                "-t",
                "60",
                "-o",
                options,
                "start",
                check=False,
            )
            if result.returncode == 0:
                self._admin = psycopg.connect(self.dsn("postgres"), autocommit=True)
                return
            last_error = result.stderr + self._log_tail()
            if "could not bind" not in last_error and "already in use" not in last_error:
                break
        pytest.fail(f"PostgreSQL did not start:\n{last_error}")

    def _log_tail(self) -> str:
        try:
            return self.log.read_text()[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self._admin is not None:
            with contextlib.suppress(psycopg.Error):
                self._admin.close()
            self._admin = None
        if (self.data / "postmaster.pid").exists():
            self._run(
                str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop",
                check=False,
            )  # fmt: skip
        shutil.rmtree(self.base, ignore_errors=True)

    # -- databases --

    def dsn(self, database: str) -> str:
        return (
            f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"
            "?connect_timeout=10"
        )

    def url(self, database: str) -> str:
        """SQLAlchemy URL (psycopg 3 driver) of ``database``."""
        return f"postgresql+psycopg://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, prefix: str = "t") -> str:
        name = f"{prefix}_{secrets.token_hex(6)}"
        assert re.fullmatch(r"[a-z0-9_]+", name)
        assert self._admin is not None
        self._admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')  # type: ignore[arg-type]
        return name

    def drop_database(self, name: str) -> None:
        assert re.fullmatch(r"[a-z0-9_]+", name)
        assert self._admin is not None
        self._admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


def _postgres_ids() -> tuple[int, int]:
    import pwd  # Unix only, needed only as root

    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail(MISSING.format(what="the 'postgres' OS user"), pytrace=False)
    return entry.pw_uid, entry.pw_gid


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A private PostgreSQL cluster for this session (one per xdist worker)."""
    cluster = PostgresCluster(find_bindir())
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def postgres(postgres_cluster: PostgresCluster) -> Iterator[str]:
    """A fresh, empty database for this test; yields its SQLAlchemy URL."""
    name = postgres_cluster.create_database()
    try:
        yield postgres_cluster.url(name)
    finally:
        postgres_cluster.drop_database(name)
