"""Write a file atomically: a temporary file in the target's directory, fsync, then rename.

Readers of the target see either the old content or the complete new one, never a partial
file; on failure the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, cast

from sealtorch.errors import ConfigError

__all__ = ["AtomicFile"]


class AtomicFile:
    """``with AtomicFile(path) as f: f.file.write(...)``; commits only when the block succeeds."""

    def __init__(
        self, target: str | os.PathLike[str], *, overwrite: bool = False, mode: int = 0o644
    ) -> None:
        self.target = Path(target)
        self._overwrite = overwrite
        self._mode = mode
        if not overwrite and self.target.exists():
            raise ConfigError(
                f"{self.target} already exists; pass --force (overwrite=True) to replace it"
            )
        directory = self.target.parent
        try:
            fd, name = tempfile.mkstemp(
                dir=directory, prefix=f".{self.target.name}.", suffix=".tmp"
            )
        except FileNotFoundError as exc:
            raise ConfigError(f"directory {directory} does not exist") from exc
        except OSError as exc:
            raise ConfigError(f"cannot create a file in {directory}: {exc.strerror}") from exc
        self.temp_path = Path(name)
        self.file: BinaryIO = cast(BinaryIO, os.fdopen(fd, "wb", buffering=0))
        self._done = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` (the file is unbuffered, so loop over partial writes)."""
        view = memoryview(data).cast("B")
        while view:
            view = view[self.file.write(view) :]

    def commit(self) -> None:
        if self._done:
            return
        try:
            self.file.flush()
            os.fchmod(self.file.fileno(), self._mode)
            os.fsync(self.file.fileno())
            self.file.close()
            if self._overwrite:
                self.temp_path.replace(self.target)
            else:
                self._link_no_overwrite()
        except BaseException:
            self.abort()
            raise
        self._done = True
        self._fsync_directory()

    def _link_no_overwrite(self) -> None:
        try:
            os.link(self.temp_path, self.target)
        except FileExistsError as exc:
            raise ConfigError(
                f"{self.target} appeared while it was being written; nothing was overwritten"
            ) from exc
        except OSError:
            # Filesystems without hard links: the existence check in __init__ has to do.
            if self.target.exists():
                raise ConfigError(f"{self.target} already exists") from None
            self.temp_path.replace(self.target)
            return
        self.temp_path.unlink()

    def _fsync_directory(self) -> None:
        with contextlib.suppress(OSError):
            fd = os.open(self.target.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(FileNotFoundError):
            self.temp_path.unlink()

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
