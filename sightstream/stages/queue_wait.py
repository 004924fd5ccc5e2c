"""Live mode under overload: which frames a read admits, so the model gets full batches of
live frames from every camera.

While more than a batch waits for the device (it is behind), the queue ahead of a frame is
known (the frames the pipeline holds that no device has taken) and so is the pace the device
takes them at (over the last 3 s). Two rules then hold at read:
- a frame that would be older than `max_age_ms` by the time it reaches the device is dropped:
  checked only against its age when read, it took a place in the queue and a slot in a batch,
  to be dropped at the device (batches reached the model half empty, 4.5 frames of 8);
- each camera holds at most an equal share of the queue the device clears within
  `max_age_ms`; a camera's frames past its share are dropped, its oldest first (it skips
  ahead, as a live source does). Without shares, the cameras with a backlog kept the queue
  full: a camera's fresh frames waited behind them until stale, and the first rule alone gave
  one camera 3-20 % of its frames while the one beside it had 99 %, or starved the slow ones.
Below that the device keeps up (what it takes per second is then what arrives, not what it
could take), and the frames waiting are the batch being gathered: frames are checked against
`max_age_ms` alone."""

from __future__ import annotations

import time
from collections import Counter, deque

WINDOW_S = 3.0  # the device's pace over this long
STALLED_S = 2.0  # nothing taken for this long (or twice the usual gap): pace unknown (a load, a stuck call)


class QueueWait:
    def __init__(self, batch_size: int, max_age_ms: int) -> None:
        self._batch_size = batch_size
        self._max_age_ms = max_age_ms
        self._taken: deque[tuple[float, int]] = deque()  # (when, frames) the device took

    def taken(self, frames: int) -> None:
        """The device took `frames` of this pipeline's frames (to run, or to drop as stale)."""
        now = time.monotonic()
        self._taken.append((now, frames))
        while self._taken and now - self._taken[0][0] > WINDOW_S:
            self._taken.popleft()

    def pace(self) -> float:
        """Frames the device took per second lately; 0 while that is not known."""
        now = time.monotonic()
        if len(self._taken) < 2:
            return 0.0
        span = self._taken[-1][0] - self._taken[0][0]
        # stalled: nothing taken for twice the usual gap (a slow model's calls take seconds)
        if now - self._taken[-1][0] > max(STALLED_S, 2 * span / (len(self._taken) - 1)):
            return 0.0
        return sum(n for _, n in list(self._taken)[1:]) / span if span >= 0.5 else 0.0

    def limits(self, waiting: Counter[str], stream: str) -> tuple[int, int | None]:
        """For a read of `stream`, given the frames no device has taken yet, by stream: the
        age (ms) past which a frame is dropped, and how many more of its frames may wait
        (None: any number, the device keeps up)."""
        total = sum(waiting.values())
        pace = self.pace()
        if total <= self._batch_size or not pace:
            return self._max_age_ms, None
        wait_ms = int(1000 * total / pace)
        # what the device clears within max_age_ms (the age rule bounds the queue to that), and
        # at least four batches: the closed ones a device queue holds, the one gathered and one
        # more (with fewer, batches close half empty)
        queue = max(4 * self._batch_size, pace * self._max_age_ms / 1000)
        share = max(1, int(queue // len(set(waiting) | {stream})))
        # (at most all of it: a queue longer than max_age_ms admits nothing until it is not)
        return self._max_age_ms - min(self._max_age_ms - 1, wait_ms), share - waiting[stream]
