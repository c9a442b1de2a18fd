"""The read deadlines every server keeps (ReadWatch), at fixed times on a fake event loop, and
the timeouts' own checks. The servers' tests drive the same rules over real sockets."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any

import pytest

from sealtorch._listen import MAX_HEAD_BYTES, ReadTimeouts, ReadWatch
from sealtorch.errors import ConfigError

TIMEOUTS = ReadTimeouts(header=10.0, body=30.0, keep_alive=5.0)


class _Handle:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """The two event loop methods a ReadWatch uses, on a clock that tests move."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._timers: list[tuple[float, int, _Handle, Callable[[], None]]] = []
        self._order = itertools.count()

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], None]) -> _Handle:
        handle = _Handle()
        heapq.heappush(self._timers, (when, next(self._order), handle, callback))
        return handle

    def advance(self, seconds: float) -> None:
        """Move the clock, running the timers that come due on the way."""
        target = self.now + seconds
        while self._timers and self._timers[0][0] <= target:
            when, _, handle, callback = heapq.heappop(self._timers)
            self.now = max(self.now, when)
            if not handle.cancelled:
                callback()
        self.now = target

    def pending(self) -> int:
        return sum(not handle.cancelled for _, _, handle, _ in self._timers)


class Watched:
    def __init__(self) -> None:
        self.loop = FakeLoop()
        self.expired: list[str] = []
        self.watch = ReadWatch(self.loop, TIMEOUTS, self.expired.append)  # type: ignore[arg-type]

    def request(self, *, body: bool = False) -> None:
        """A whole request arrives at once (head, and body if any)."""
        self.watch.received(100)
        self.watch.message_begun()
        self.watch.head_complete()
        if body:
            self.watch.received(100)
        self.watch.message_complete()


@pytest.fixture
def watched() -> Watched:
    return Watched()


def test_a_new_connection_owes_a_head_within_the_header_timeout(watched: Watched) -> None:
    watched.loop.advance(9.9)
    assert watched.expired == []
    watched.loop.advance(0.2)
    assert watched.expired == ["head"]


def test_bytes_of_a_head_do_not_extend_its_deadline(watched: Watched) -> None:
    watched.watch.message_begun()
    for _ in range(12):
        watched.watch.received(1)
        watched.loop.advance(1.0)
    assert watched.expired == ["head"]


def test_a_body_may_take_long_but_not_pause_long(watched: Watched) -> None:
    watched.watch.received(200)
    watched.watch.message_begun()
    watched.watch.head_complete()
    for _ in range(10):  # 250 s in all, never 30 s without a byte
        watched.loop.advance(25.0)
        watched.watch.received(10)
    assert watched.expired == []
    watched.loop.advance(30.1)
    assert watched.expired == ["body"]


def test_no_clock_runs_while_the_server_answers(watched: Watched) -> None:
    watched.request(body=True)
    watched.loop.advance(3600.0)
    assert watched.expired == []
    assert watched.loop.pending() == 0
    watched.watch.answered()
    watched.loop.advance(4.9)
    assert watched.expired == []
    watched.loop.advance(0.2)
    assert watched.expired == ["idle"]


def test_the_next_request_gets_a_fresh_head_deadline(watched: Watched) -> None:
    watched.request()
    watched.watch.answered()
    watched.loop.advance(4.0)  # idle, within keep-alive
    watched.watch.received(1)
    watched.watch.message_begun()
    watched.loop.advance(9.0)  # 13 s after the response, 9 s into the head
    assert watched.expired == []
    watched.loop.advance(1.1)
    assert watched.expired == ["head"]


def test_pipelined_requests_wait_for_the_answers_before_them(watched: Watched) -> None:
    watched.request()
    watched.request()
    watched.watch.received(10)
    watched.watch.message_begun()  # a third, partial, head behind two unanswered requests
    watched.loop.advance(100.0)
    assert watched.expired == []
    watched.watch.answered()
    watched.loop.advance(100.0)
    assert watched.expired == []
    watched.watch.answered()  # now the partial head is the client's to finish
    watched.loop.advance(10.1)
    assert watched.expired == ["head"]


def test_an_early_answer_leaves_the_body_owed(watched: Watched) -> None:
    watched.watch.received(100)
    watched.watch.message_begun()
    watched.watch.head_complete()
    watched.watch.answered()  # e.g. 413 before the body was read
    watched.loop.advance(30.1)
    assert watched.expired == ["body"]


def test_heads_are_counted_until_complete(watched: Watched) -> None:
    watched.watch.received(MAX_HEAD_BYTES)
    assert not watched.watch.head_too_large()
    watched.watch.received(1)
    assert watched.watch.head_too_large()
    watched.watch.message_begun()
    watched.watch.head_complete()
    watched.watch.received(10 * MAX_HEAD_BYTES)  # body bytes do not count
    assert not watched.watch.head_too_large()


def test_a_closed_watch_never_fires(watched: Watched) -> None:
    watched.watch.close()
    watched.loop.advance(3600.0)
    assert watched.expired == []


def test_one_timer_is_set_however_many_bytes_arrive(watched: Watched) -> None:
    watched.watch.message_begun()
    watched.watch.head_complete()
    for _ in range(1000):
        watched.watch.received(1)
    assert watched.loop.pending() == 1


@pytest.mark.parametrize(
    "changes", [{"header": 0}, {"body": -1.0}, {"keep_alive": 3601.0}], ids=str
)
def test_timeouts_must_be_positive_and_at_most_an_hour(changes: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="timeout"):
        ReadTimeouts(**changes)
