"""Interrupting FFmpeg while it blocks in a network read, from the reader's own stop flag or
stall watchdog. FFmpeg's only way in is a container's interrupt callback, which PyAV drives
from a timeout it alone arms; the callback compares `time.monotonic()` (read from
av.container.core's module globals) with the call's deadline. The clock below answers a
reader thread whose guard tripped with a time far past any deadline."""

from __future__ import annotations

import itertools
import threading
import time
from types import ModuleType
from typing import Any

import av.container.core


class Guard:
    """What the interrupt callback asks for one reader thread: stopped, or stalled."""

    def __init__(self, stop: threading.Event, stall_s: float) -> None:
        self.stop, self.stall_s = stop, stall_s
        self.watching = False  # the stall clock runs while reading, not while opening
        self.last = time.monotonic()
        self.fired: str | None = None  # sticky until the next open: FFmpeg may ask again

    def progress(self) -> None:
        self.last = time.monotonic()

    def arm(self, watching: bool) -> None:
        self.watching, self.fired = watching, None
        self.progress()

    def tripped(self) -> bool:
        if self.fired is None:
            if self.stop.is_set():
                self.fired = "stop"
            elif self.watching and time.monotonic() - self.last > self.stall_s:
                self.fired = "stall"
        return self.fired is not None


guards: dict[int, Guard] = {}


class _InterruptingClock:
    """Stands in for the `time` module inside av.container.core, whose interrupt callback aborts
    I/O once `time.monotonic()` passes the start of the current call plus its timeout. To a
    reader thread whose guard tripped, each call answers far later than the one before, so
    FFmpeg gives up at its next poll (<= 0.1 s). Other threads see the real clock. Should PyAV
    drop this seam, stop() and the watchdog fall back to the open and read timeouts."""

    def __init__(self) -> None:
        self._jumps = itertools.count(1)

    def monotonic(self) -> float:
        guard = guards.get(threading.get_ident())
        if guard is not None and guard.tripped():
            return time.monotonic() + 1e9 * next(self._jumps)
        return time.monotonic()

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


if isinstance(getattr(av.container.core, "time", None), ModuleType):
    setattr(av.container.core, "time", _InterruptingClock())  # noqa: B010 (not in the stubs)
