"""The key cache's clock: wall time at start, advanced by the monotonic clock.

Leases and nonce expiries must not jump when someone sets the host's wall clock (the host is
untrusted). :class:`MonotonicClock` reads the wall clock once, then only adds elapsed monotonic
time, so a changed system time does not extend or cut short a running lease. Tests inject their
own clock (any ``Callable[[], datetime]`` returning aware UTC times).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

__all__ = ["MonotonicClock"]


class MonotonicClock:
    """Aware UTC ``datetime`` from a wall-clock anchor plus monotonic elapsed time."""

    def __init__(self) -> None:
        self._anchor = datetime.now(UTC)
        self._start = time.monotonic()

    def __call__(self) -> datetime:
        return self._anchor + timedelta(seconds=time.monotonic() - self._start)

    def __repr__(self) -> str:
        return f"MonotonicClock(anchor={self._anchor.isoformat()})"
