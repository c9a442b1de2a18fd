"""Progress of long byte-stream operations (encrypt, decrypt): a bar on a terminal, structured
log lines otherwise, nothing under ``-q``."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["_Progress", "model_progress"]

#: Inputs at least this large get a progress bar.
_PROGRESS_THRESHOLD = 64 * 1024 * 1024


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError  # pragma: no cover


class _Progress:
    """A progress callback for large inputs: a bar on stderr when it is a terminal, else one
    structured log line (logger ``sealtorch.progress``: op, done, total, percent, rate) per
    tenth of the way; nothing under ``-q``. Times the bytes from the first chunk on (not
    imports and checks)."""

    def __init__(self, description: str, *, quiet: bool, terminal: bool | None = None) -> None:
        self._description = description
        self._quiet = quiet
        self._bar: Any = None
        self._task: Any = None
        self._start: float | None = None
        self._end: float | None = None
        self._logged = -1
        self._shown = False
        self._stopped = False
        #: Whether stderr is a terminal (None: ask it when the first progress comes).
        self._terminal = terminal

    def __call__(self, done: int, total: int) -> None:
        if self._start is None:
            self._start = time.perf_counter()
        if self._quiet or self._stopped or total < _PROGRESS_THRESHOLD:
            return
        if self._terminal is None:
            self._terminal = sys.stderr.isatty()
        if not self._terminal:
            self._log(done, total)
            return
        if self._bar is None:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._bar.start()
            self._shown = True
            self._task = self._bar.add_task(self._description, total=total)
        self._bar.update(self._task, completed=done)
        if done >= total:  # a reporter handed to a loader that never calls stop()
            self.stop()

    def _log(self, done: int, total: int) -> None:
        tenth = done * 10 // max(total, 1)
        if tenth <= self._logged:
            return
        self._logged = tenth
        logger = logging.getLogger("sealtorch.progress")
        logger.setLevel(logging.INFO)
        elapsed = time.perf_counter() - (self._start or 0.0)
        rate = done / max(elapsed, 1e-9) / 1e6
        logger.info(
            "%s: %d%% (%s of %s, %.0f MB/s)",
            self._description,
            tenth * 10,
            _human(done),
            _human(total),
            rate,
            extra={
                "op": self._description,
                "done": done,
                "total": total,
                "percent": tenth * 10,
                "mb_per_s": round(rate, 1),
            },
        )

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._end = time.perf_counter()
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    @property
    def bar_shown(self) -> bool:
        """Whether a progress bar has been drawn (a large input on a terminal, not ``-q``)."""
        return self._shown

    @property
    def elapsed(self) -> float:
        if self._start is None or self._end is None:
            return 0.0
        return self._end - self._start


def model_progress(ctx: Any) -> Callable[[str], _Progress]:
    """For ``sealtorch serve``: a progress reporter per model it loads (``decrypting NAME``),
    silent under the root command's ``-q``."""
    root = ctx.find_root()
    quiet = bool(root.obj and root.obj.get("quiet"))
    return lambda name: _Progress(f"decrypting {name}", quiet=quiet)
