"""Frames per second each stream gave this daemon lately: what a tracking pipeline's daemons
balance their sources by (stages/source_leases.py). A camera sending one frame every 2 s
weighs 1/30 of one at 15 fps, where a count of active streams weighed them the same.

Counts are kept per whole second over the last WINDOW_S, and a rate divides by the time the
stream has been read here, if shorter: a stream taken over a moment ago has its true rate after
its first read, not after a window's worth of reads (the daemon that handed it over would
otherwise see the taker still idle, and hand it more)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

WINDOW_S = 10  # a stream that gave no frame for this long has rate 0: idle


class StreamRates:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._counts: dict[str, deque[list[int]]] = {}  # stream -> [second, frames], oldest first
        self._since: dict[str, float] = {}  # stream -> when it was first counted (or came back)

    def add(self, stream: str, frames: int) -> None:
        now = self._clock()
        second = int(now)
        counts = self._counts.get(stream)
        if counts and counts[-1][0] == second:
            counts[-1][1] += frames
            return
        if not counts or counts[-1][0] <= second - WINDOW_S:  # new, or back after a window idle
            counts = self._counts[stream] = deque()
            self._since[stream] = now
        counts.append([second, frames])
        self._prune(counts, second)

    def fps(self, stream: str) -> float:
        counts = self._counts.get(stream)
        if not counts:
            return 0.0
        now = self._clock()
        self._prune(counts, int(now))
        if not counts:  # idle for a whole window: it starts afresh when it sends again
            self.drop(stream)
            return 0.0
        seen_s = min(float(WINDOW_S), now - self._since[stream])
        return sum(n for _, n in counts) / max(1.0, seen_s)

    def drop(self, stream: str) -> None:
        self._counts.pop(stream, None)
        self._since.pop(stream, None)

    @staticmethod
    def _prune(counts: deque[list[int]], second: int) -> None:
        while counts and counts[0][0] <= second - WINDOW_S:
            counts.popleft()
