"""A producer's clock, as its frames show it: how far a frame's `ts` (its capture time, by the
producer's clock) lies from when it reached Redis (its entry ID, by Redis's clock).

Cameras without NTP drift by seconds to days, and some producers write `ts` in seconds or as
media time. FPS sampling works on any steady clock and live mode ages frames from their arrival,
but latency (results' `latency_ms`, the latency histogram and its alert) counts from `ts`: a
camera a day behind read as a day late, one ahead as 0 ms, and nothing named the camera. Each
source's latest skew is shown (`GET /pipelines/{name}` → `sources[].clock_skew_ms`), and one
past SKEW_WARN_MS is said (log `source_clock_skew`) once per source every SAY_EVERY_S, whichever
pipelines read it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from sightstream import log

_log = log.get(__name__)

SKEW_WARN_MS = 2_000  # an encoder's delay stays well under it
SAY_EVERY_S = 600.0
MOST_SOURCES = 4096  # sources remembered (the least recently seen go first)


class ClockSkews:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._skew: OrderedDict[tuple[str, str], int] = OrderedDict()  # (pipeline, source) -> ms
        self._said: OrderedDict[str, float] = OrderedDict()  # source -> when last said

    def note(self, pipeline: str, source: str, skew_ms: int) -> None:
        """A frame of `source` was read whose ts is `skew_ms` after its arrival (negative: before)."""
        key = (pipeline, source)
        self._skew[key] = skew_ms
        self._skew.move_to_end(key)
        if len(self._skew) > MOST_SOURCES:
            self._skew.popitem(last=False)
        if abs(skew_ms) < SKEW_WARN_MS:
            return
        now = self._clock()
        said = self._said.get(source)
        if said is not None and now - said < SAY_EVERY_S:
            return
        self._said[source] = now
        self._said.move_to_end(source)
        if len(self._said) > MOST_SOURCES:
            self._said.popitem(last=False)
        way = "before" if skew_ms < 0 else "after"
        _log.warning("source_clock_skew", pipeline=pipeline, source=source, skew_ms=skew_ms,
                     problem=f"its frames' ts is {_span(abs(skew_ms))} {way} they reached Redis",
                     hint="the producer's clock is off (set up NTP on it), it sends frames late, or its "
                          "ts is not ms since the epoch (seconds? media time?); latency counts from ts, "
                          "live mode ages frames from their arrival")

    def of(self, pipeline: str, source: str) -> int | None:
        return self._skew.get((pipeline, source))


def _span(ms: int) -> str:
    seconds = ms / 1000
    for unit, size in (("days", 86_400), ("hours", 3_600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"
