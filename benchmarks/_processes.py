"""Start and stop the real server processes the benchmarks measure, and read their CPU time."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any


def start_process(
    command: list[str],
    *,
    ready: re.Pattern[str],
    timeout: float,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> tuple[subprocess.Popen[str], re.Match[str], float]:
    """Start ``command`` and wait for the first line of its stdout that matches ``ready``.

    Returns the process, the match and the seconds from spawn to that line (the time is taken
    when the line is read). ``env`` is added to this process's environment. A process that
    prints no such line within ``timeout`` seconds (or exits first) is killed.
    """
    started = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=None if env is None else {**os.environ, **env},
    )
    assert process.stdout is not None
    stdout = process.stdout
    found: list[tuple[re.Match[str], float]] = []
    other: list[str] = []

    def read() -> None:
        for line in stdout:
            match = ready.match(line.strip())
            if match:
                found.append((match, time.perf_counter()))
                return
            other.append(line.strip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if not found:
        process.kill()
        process.wait()
        stdout.close()
        raise RuntimeError(
            f"{' '.join(command[:6])}... printed no line matching {ready.pattern!r} within "
            f"{timeout} s (exit code {process.returncode}; other lines: {other[-3:]!r})"
        )
    match, at = found[0]
    return process, match, at - started


def stop_process(process: subprocess.Popen[str], *, timeout: float = 30) -> None:
    """SIGTERM, up to ``timeout`` seconds to exit, then SIGKILL; close its stdout."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.stdout is not None:
        process.stdout.close()


def tree_cpu_times(process: Any) -> tuple[float, float]:
    """User and system CPU seconds of a ``psutil.Process`` and its children (e.g. workers)."""
    import psutil

    user = system = 0.0
    for each in [process, *process.children(recursive=True)]:
        try:
            times = each.cpu_times()
        except psutil.Error:  # a child that just exited
            continue
        user += times.user
        system += times.system
    return user, system
