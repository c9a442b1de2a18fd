"""The local endpoint's socket file: mode and group as configured, checked from another user's
side (a real process that is not the cache's user tries to connect)."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sealtorch._listen import listen_unix
from sealtorch.errors import ConfigError

_CONNECT = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_UNIX)\n"
    "try:\n"
    "    s.connect(sys.argv[1])\n"
    "except PermissionError:\n"
    "    print('denied')\n"
    "else:\n"
    "    print('connected')\n"
)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory other users may traverse (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="sealtorch-kc-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _as_user(user: str, target: Path, *, extra_group: int | None = None) -> str:
    info = pwd.getpwnam(user)
    result = subprocess.run(
        [_SYSTEM_PYTHON, "-c", _CONNECT, str(target)],
        user=info.pw_uid,
        group=info.pw_gid,
        extra_groups=[extra_group] if extra_group is not None else [],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.strip()


#: Another user cannot run the virtual environment's interpreter (it lives under /root).
_SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not Path(_SYSTEM_PYTHON).is_file(),
    reason="switching users needs root and a system python3",
)


@needs_root
def test_default_socket_is_0600_and_refuses_other_users(public_dir: Path) -> None:
    path = public_dir / "kc.sock"
    sock = listen_unix(path)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert _as_user("nobody", path) == "denied"
    finally:
        sock.close()


@needs_root
def test_group_socket_admits_the_group_only(public_dir: Path) -> None:
    group = grp.getgrnam("nogroup") if _has_group("nogroup") else grp.getgrgid(65534)
    path = public_dir / "kc.sock"
    sock = listen_unix(path, mode=0o660, group=group.gr_name)
    try:
        info = path.stat()
        assert stat.S_IMODE(info.st_mode) == 0o660
        assert info.st_gid == group.gr_gid
        assert _as_user("daemon", path) == "denied"  # not in the group
        assert _as_user("daemon", path, extra_group=group.gr_gid) == "connected"
    finally:
        sock.close()


def _has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def test_stale_socket_is_replaced_but_a_live_one_or_a_file_is_not(tmp_path: Path) -> None:
    path = tmp_path / "kc.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file remains, nobody listens
    live = listen_unix(path)
    try:
        with pytest.raises(ConfigError, match="another process is listening"):
            listen_unix(path)
    finally:
        live.close()
    regular = tmp_path / "not-a-socket"
    regular.write_text("data")
    with pytest.raises(ConfigError, match="not a socket"):
        listen_unix(regular)
    assert regular.read_text() == "data"


def test_unknown_group_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such group"):
        listen_unix(tmp_path / "kc.sock", mode=0o660, group="no-such-group-sealtorch")
