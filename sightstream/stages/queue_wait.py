"""Live mode: how long a frame admitted now will wait before it reaches the device, from the
frames the pipeline holds and how fast the device has been taking them.

Admission drops at read a frame that would be older than `max_age_ms` by then. Checked only
against its age when read, such a frame took a place in the queue and a slot in a batch, to be
dropped at the device: batches reached the model half empty, and a camera whose oldest unread
frames were just under `max_age_ms` when read never had a live one through (3-20 % of its
frames, for as long as an overload lasted, while a camera beside it had 99 %). Self-correcting:
frames dropped at read leave the queue shorter, so the wait, and the drops, shrink."""

from __future__ import annotations

import time
from collections import deque

WINDOW_S = 3.0  # the device's pace over this long
STALLED_S = 2.0  # nothing taken for this long: the pace is not known (a load, a stuck call)


class QueueWait:
    def __init__(self) -> None:
        self._taken: deque[tuple[float, int]] = deque()  # (when, frames) the device took

    def taken(self, frames: int) -> None:
        """The device took `frames` of this pipeline's frames (to run, or to drop as stale)."""
        now = time.monotonic()
        self._taken.append((now, frames))
        while self._taken and now - self._taken[0][0] > WINDOW_S:
            self._taken.popleft()

    def seconds(self, held: int) -> float:
        """The wait of a frame admitted behind `held` others; 0 while the pace is not known."""
        now = time.monotonic()
        if len(self._taken) < 2 or now - self._taken[-1][0] > STALLED_S:
            return 0.0
        span = self._taken[-1][0] - self._taken[0][0]
        if span < 0.5:
            return 0.0
        rate = sum(n for _, n in list(self._taken)[1:]) / span  # frames per second
        return held / rate if rate > 0 else 0.0
