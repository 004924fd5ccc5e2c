"""Frames per second per stream, on a clock the test moves; entries are stamped with it, as
Redis stamps entry IDs."""

from __future__ import annotations

import pytest

from sightstream.stages.stream_rates import WINDOW_S, StreamRates


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def ms(self) -> int:
        return int(self.now * 1000)


def feed(rates: StreamRates, clock: Clock, stream: str, fps: float, seconds: float, burst: int = 3) -> None:
    """A camera at `fps` for `seconds`, read as it sends, `burst` entries a read."""
    for _ in range(int(fps * seconds / burst)):
        first = clock.ms()
        clock.now += burst / fps
        rates.add(stream, burst, first, clock.ms())


def test_a_stream_s_rate_is_right_after_its_first_seconds_and_over_the_window():
    clock = Clock()
    rates = StreamRates(clock)
    feed(rates, clock, "cam", 30, 2)
    assert rates.fps("cam") == pytest.approx(30, rel=0.15)
    feed(rates, clock, "cam", 30, 20)
    assert rates.fps("cam") == pytest.approx(30, rel=0.15)
    feed(rates, clock, "slow", 0.5, 30, burst=1)
    assert rates.fps("slow") == pytest.approx(0.5, rel=0.25)


def test_the_backlog_read_on_taking_a_stream_over_is_counted_when_it_was_sent():
    """A handover leaves a stream unread for a round or two: read at once by the taker, 3 s of
    a 15 fps camera counted as read made it look like 45-60 fps, and the taker handed streams on."""
    clock = Clock()
    rates = StreamRates(clock)
    sent_from = clock.ms()
    clock.now += 3
    rates.add("cam", 45, sent_from, clock.ms())  # the backlog, in one read
    assert rates.fps("cam") == pytest.approx(15, rel=0.15)
    feed(rates, clock, "cam", 15, 1)
    assert rates.fps("cam") == pytest.approx(15, rel=0.15)


def test_a_stream_that_stops_is_idle_after_the_window_and_counts_afresh_when_it_sends_again():
    clock = Clock()
    rates = StreamRates(clock)
    feed(rates, clock, "cam", 30, 20)
    clock.now += WINDOW_S / 2
    assert 10 < rates.fps("cam") < 20  # going down as its frames leave the window
    clock.now += WINDOW_S / 2 + 1
    assert rates.fps("cam") == 0
    feed(rates, clock, "cam", 10, 2)
    assert rates.fps("cam") == pytest.approx(10, rel=0.15)
    clock.now += WINDOW_S + 1
    feed(rates, clock, "cam", 20, 2)  # back without a look in between: counted afresh too
    assert rates.fps("cam") == pytest.approx(20, rel=0.15)


def test_a_dropped_stream_is_forgotten():
    clock = Clock()
    rates = StreamRates(clock)
    feed(rates, clock, "cam", 30, 2)
    rates.drop("cam")
    assert rates.fps("cam") == 0 and not rates._counts and not rates._since
