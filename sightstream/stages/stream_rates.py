"""Frames per second each stream gives this daemon: what a tracking pipeline's daemons balance
their sources by (stages/source_leases.py). A camera sending one frame every 2 s weighs 1/30
of one at 15 fps, where a count of active streams weighed them the same.

Frames are counted by when they were sent (their entry IDs: Redis's clock at XADD), per whole
second over the last WINDOW_S, and a rate divides by the time the stream has been seen, if
shorter. Counted by when they were read, the backlog a daemon reads on taking a stream over
(it went unread for a round or two) made a 15 fps camera look like 40 to 60: the taker then
seemed overloaded and handed streams on, which bounced."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

WINDOW_S = 10  # a stream that sent no frame for this long has rate 0: idle


class StreamRates:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock  # wall clock: entry IDs are
        self._counts: dict[str, deque[list[float]]] = {}  # stream -> [second sent, frames], oldest first
        self._since: dict[str, float] = {}  # stream -> the earliest of: first read here, first frame counted

    def add(self, stream: str, frames: int, first_ms: int, last_ms: int) -> None:
        """`frames` read of `stream`, sent from `first_ms` to `last_ms` (their entry IDs)."""
        now = self._clock()
        counts = self._counts.get(stream)
        if counts is None or (counts and counts[-1][0] <= now - WINDOW_S):  # new, or back from idle
            counts = self._counts[stream] = deque()
            self._since[stream] = now
        self._since[stream] = min(self._since[stream], first_ms / 1000)
        first, last = first_ms // 1000, max(first_ms, last_ms) // 1000
        share = frames / (last - first + 1)  # spread over the seconds they were sent in
        for second in range(max(first, int(now) - WINDOW_S), last + 1):
            if counts and counts[-1][0] >= second:  # the newest second (or, reclaimed, one before it)
                counts[-1][1] += share
            else:
                counts.append([second, share])
        self._prune(counts, now)

    def fps(self, stream: str) -> float:
        counts = self._counts.get(stream)
        if not counts:
            return 0.0
        now = self._clock()
        self._prune(counts, now)
        if not counts:  # idle for a whole window: it starts afresh when it sends again
            self.drop(stream)
            return 0.0
        seen_s = min(float(WINDOW_S), now - self._since[stream])
        return sum(n for _, n in counts) / max(1.0, seen_s)

    def drop(self, stream: str) -> None:
        self._counts.pop(stream, None)
        self._since.pop(stream, None)

    @staticmethod
    def _prune(counts: deque[list[float]], now: float) -> None:
        while counts and counts[0][0] <= now - WINDOW_S:
            counts.popleft()
