"""The one polling helper: wait for a condition that another thread or process makes true."""

from __future__ import annotations

import time
from collections.abc import Callable


def eventually(
    check: Callable[[], bool], *, timeout: float = 30.0, interval: float = 0.02, what: str = ""
) -> None:
    """Return once ``check()`` is true; fail the test if it is still false after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what or 'the condition'}")
        time.sleep(interval)
