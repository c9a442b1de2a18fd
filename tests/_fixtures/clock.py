"""An injectable clock for time-dependent tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


class FakeClock:
    """Returns :attr:`now` (aware UTC); tests move it with :meth:`advance`."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now
