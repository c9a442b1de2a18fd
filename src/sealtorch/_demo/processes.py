"""Child processes for the demo: start a sealtorch service, wait for its ready line, stop it.

Each service runs as a real process (``python -m sealtorch ...``) on real sockets. Its stdout is
read line by line in a thread so that the machine-readable lines (``listening on URL``,
``ready ...``) can be awaited; stdout and stderr are also written to a log file in the workspace,
which is where to look when something fails.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from sealtorch.errors import Error

__all__ = ["ServiceProcess", "ServiceStartError"]


class ServiceStartError(Error):
    """A demo service exited or did not become ready in time."""


class ServiceProcess:
    """One ``sealtorch`` subcommand running in a child process."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        *,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        command = [sys.executable, "-m", "sealtorch", *args]
        self._log.write("$ " + " ".join(command) + "\n")
        self._log.flush()
        self._process = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
            command,
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            text=True,
            bufsize=1,
            start_new_session=True,  # Ctrl-C in the terminal reaches the demo, which stops us
        )
        assert self._process.stdout is not None  # noqa: S101 - stdout=PIPE
        self._reader = threading.Thread(
            target=self._pump, args=(self._process.stdout,), name=f"{name}-stdout", daemon=True
        )
        self._reader.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._log.write(line)
            self._log.flush()
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    @property
    def pid(self) -> int:
        return self._process.pid

    def wait_for(self, pattern: str, *, timeout: float) -> re.Match[str]:
        """Wait until a stdout line matches ``pattern``; fail clearly if the process dies."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServiceStartError(
                    f"the {self.name} did not report {pattern!r} within {timeout:.0f} s; "
                    f"see its log: {self.log_path}"
                )
            try:
                line = self._lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if line is None:
                status = self._process.wait()
                raise ServiceStartError(
                    f"the {self.name} exited with status {status} before it was ready:\n"
                    f"{self.tail()}\n(full log: {self.log_path})"
                )
            match = regex.search(line)
            if match:
                return match

    def wait(self, *, timeout: float) -> int:
        """Wait for the process to exit by itself; returns its exit status."""
        try:
            return self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise ServiceStartError(
                f"the {self.name} did not exit within {timeout:.0f} s; see its log: {self.log_path}"
            ) from exc

    def log_lines(self) -> list[str]:
        """Everything the process wrote so far (stdout and stderr)."""
        if self._process.poll() is not None:
            self._reader.join(timeout=2)  # everything it printed is in the log
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()

    def tail(self, lines: int = 12) -> str:
        self._log.flush()
        text = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join("    " + line for line in text[-lines:])

    def stop(self, *, timeout: float = 15.0) -> int | None:
        """SIGTERM (graceful), then SIGKILL after ``timeout``; returns the exit status."""
        if self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait()
        self._reader.join(timeout=2)
        if self._process.stdout is not None:
            self._process.stdout.close()
        self._log.close()
        return self._process.returncode
