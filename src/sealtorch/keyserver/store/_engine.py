"""Engine setup: the store URL parsed and checked, and an SQLAlchemy engine configured for it.

SQLite: WAL journal, foreign keys on, a busy timeout, ``synchronous=FULL`` by default (a
committed key or audit record survives power loss, not just a crash). pysqlite's own transaction
handling is switched off so that writes start with ``BEGIN IMMEDIATE`` (the write lock is taken
up front: no deadlock-prone lock upgrades) and reads with a plain ``BEGIN``.

PostgreSQL (psycopg 3): READ COMMITTED; a ``lock_timeout`` equal to the busy timeout so that a
stuck lock becomes an error instead of a hang.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc

from sealtorch.errors import ConfigError, StorageCorruptError, StorageError, StorageFullError

__all__ = ["WRITE", "Database", "failure_kind", "first_line", "open_database"]

#: The execution option that makes a connection's transaction a write (``BEGIN IMMEDIATE``).
WRITE = "sealtorch_write"
_SYNC_MODES = ("FULL", "NORMAL", "EXTRA")


def first_line(exc: BaseException) -> str:
    """``Type: first line`` of a database error (for StorageError messages and the log)."""
    original = getattr(exc, "orig", None) or exc
    text = str(original).strip().splitlines()
    return f"{type(original).__name__}: {text[0][:200]}" if text else type(original).__name__


# SQLite result codes and PostgreSQL SQLSTATEs that mean "damaged" or "no space".
_CORRUPT = frozenset({"SQLITE_CORRUPT", "SQLITE_NOTADB", "XX001", "XX002"})
_FULL = frozenset({"SQLITE_FULL", "53100"})


def failure_kind(exc: BaseException) -> type[StorageError]:
    """The StorageError class a database error stands for: :class:`StorageCorruptError`,
    :class:`StorageFullError` or plain :class:`StorageError` (unreachable, locked, ...)."""
    original = getattr(exc, "orig", None) or exc
    names = {
        str(getattr(original, "sqlite_errorname", "") or ""),
        str(getattr(original, "sqlstate", "") or ""),
    }
    text = str(original).lower()
    if _named(names, _CORRUPT) or "malformed" in text or "file is not a database" in text:
        return StorageCorruptError
    if _named(names, _FULL) or "disk is full" in text or "no space left" in text:
        return StorageFullError
    return StorageError


def _named(names: set[str], codes: frozenset[str]) -> bool:
    """Whether a result code (or an extended one: ``SQLITE_CORRUPT_INDEX``) is in ``codes``."""
    return any(name.startswith(code) for name in names if name for code in codes)


@dataclass(frozen=True, slots=True)
class Database:
    """An engine and what the store needs to know about it."""

    engine: sa.Engine
    #: ``"sqlite"`` or ``"postgresql"``.
    backend: str
    #: The URL without its password.
    description: str
    #: The SQLite database file (``None`` for PostgreSQL).
    sqlite_path: Path | None


def open_database(
    url: str, *, busy_timeout: float, sqlite_synchronous: str, pool_size: int, create: bool
) -> Database:
    """The engine for ``url`` (ConfigError for a bad URL or an unusable SQLite path).

    ``create=False``: a missing or empty (0-byte) SQLite file is refused instead of created —
    ``keyserver serve`` must never start on a new, empty store (a volume that failed to mount
    looks exactly like that)."""
    try:
        parsed = sa.engine.make_url(url)
    except sa_exc.ArgumentError as exc:
        raise ConfigError(
            "the store URL is not valid; use sqlite:///PATH or "
            "postgresql+psycopg://USER:PASSWORD@HOST/DB"
        ) from exc
    backend = parsed.get_backend_name()
    timeout_ms = max(1, int(busy_timeout * 1000))
    synchronous = sqlite_synchronous.upper()
    sqlite_path: Path | None = None
    if backend == "sqlite":
        engine = _sqlite_engine(parsed, timeout_ms, synchronous, create=create)
        sqlite_path = Path(str(parsed.database))
    elif backend == "postgresql":
        if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg2"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        if parsed.drivername != "postgresql+psycopg":
            raise ConfigError(
                "PostgreSQL store URLs use the psycopg 3 driver: postgresql+psycopg://"
            )
        engine = sa.create_engine(
            parsed,
            hide_parameters=True,
            pool_pre_ping=True,
            pool_size=pool_size,
            max_overflow=pool_size,
            connect_args={"options": f"-c lock_timeout={timeout_ms}"},
        )
    else:
        raise ConfigError(
            f"unsupported store backend {backend!r}; use sqlite:///PATH or postgresql+psycopg://..."
        )
    return Database(
        engine=engine,
        backend=backend,
        description=parsed.render_as_string(hide_password=True),
        sqlite_path=sqlite_path,
    )


def _sqlite_engine(parsed: sa.URL, timeout_ms: int, synchronous: str, *, create: bool) -> sa.Engine:
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:"):
        raise ConfigError(
            "the SQLite store must be a file (sqlite:///PATH); an in-memory database would "
            "lose every key when the server stops"
        )
    if synchronous not in _SYNC_MODES:
        raise ConfigError(f"sqlite_synchronous must be one of {', '.join(_SYNC_MODES)}")
    path = Path(database)
    if not path.parent.is_dir():
        raise ConfigError(f"the directory of the SQLite store {path} does not exist")
    if not create:
        _check_existing(path)
    try:  # create the file ourselves so it is private (SQLite would use the umask)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot create the SQLite store {path}: {exc.strerror}") from exc
    engine = sa.create_engine(parsed, hide_parameters=True)

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, connection_record: Any) -> None:
        del connection_record
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {timeout_ms}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute(f"PRAGMA synchronous = {synchronous}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        # On the driver's connection: through exec_driver_sql this costs several times the
        # statement (every group commit begins here); errors are SQLAlchemy's as before.
        statement = "BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE, False) else "BEGIN"
        try:
            conn.connection.dbapi_connection.execute(statement)  # type: ignore[union-attr]
        except sqlite3.Error as exc:
            raise sa_exc.DBAPIError.instance(
                statement, None, exc, sqlite3.Error, hide_parameters=True, dialect=conn.dialect
            ) from exc

    return engine


def _check_existing(path: Path) -> None:
    """Refuse a missing or empty SQLite store (see :func:`open_database`)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ConfigError(
            f"the key store {path} does not exist; `keyserver serve` never creates one: check "
            "that the volume holding it is mounted and database_url is right (a new key "
            "server is made with `sealtorch keyserver init`)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the key store {path}: {exc.strerror}") from exc
    if size == 0:
        raise ConfigError(
            f"the key store {path} is empty (0 bytes); check that the volume holding it is "
            'mounted, or restore it from a backup (docs/keyserver.md, "Backups and restore")'
        )
