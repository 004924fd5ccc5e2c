"""What every stage shares: the STOP sentinel, the in-flight registry, queue and back-off helpers."""

from __future__ import annotations

import asyncio
import random
from typing import Any, Final

from sightstream.frames import Frame


class _Stop:
    def __repr__(self) -> str:
        return "STOP"


STOP: Final = _Stop()


class InFlight:
    """The frames a pipeline holds, from read to acknowledgement, bounded by `capacity`.

    Readers reserve room before they read (so they read only what there is room for: backlog
    waits in Redis, never here), then `hold` each frame they queue; a frame's `release()`
    (called once it is acknowledged, or abandoned to be retried) frees its place. The registry
    also tells the heartbeat which entries this daemon is still working on."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free = capacity
        self._room = asyncio.Event()
        self._room.set()
        self._frames: dict[tuple[str, str], Frame] = {}

    async def take(self, most: int) -> int:
        """Reserve room for up to `most` frames, waiting until there is room for one."""
        while self._free <= 0:
            self._room.clear()
            await self._room.wait()
        n = min(most, self._free)
        self._free -= n
        return n

    def give(self, n: int = 1) -> None:
        """Return reserved room that was not used."""
        self._free += n
        self._room.set()

    def hold(self, frame: Frame) -> bool:
        """Track a frame in one reserved place; its release() gives the place back once.
        False (and nothing held) when this entry is already in flight here: skip the copy."""
        key = (frame.stream, frame.entry_id)
        if key in self._frames:
            return False
        self._frames[key] = frame
        frame.release = _Release(self, key)
        return True

    def _release(self, key: tuple[str, str]) -> None:
        if self._frames.pop(key, None) is not None:
            self.give()

    def holds(self, stream: str, entry_id: str) -> bool:
        return (stream, entry_id) in self._frames

    def frames(self) -> list[Frame]:
        return list(self._frames.values())

    @property
    def in_flight(self) -> int:
        """Frames held now (room reserved for a read in progress is not a frame)."""
        return len(self._frames)


class _Release:
    __slots__ = ("_in_flight", "_key")

    def __init__(self, in_flight: InFlight, key: tuple[str, str]) -> None:
        self._in_flight: InFlight | None = in_flight
        self._key = key

    def __call__(self) -> None:
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            in_flight._release(self._key)


def drain_nowait(queue: asyncio.Queue, first: Any, most: int) -> tuple[list[Any], bool]:
    """`first` plus whatever is already queued, up to `most` items. Returns (items, stopped):
    a STOP met on the way ends the list and is reported, not returned."""
    items = [first]
    while len(items) < most:
        try:
            item = queue.get_nowait()
        except asyncio.QueueEmpty:
            break
        if item is STOP:
            return items, True
        items.append(item)
    return items, False


def backoff_s(failures: int, cap: float = 5.0) -> float:
    """Exponential back-off with jitter: 0.1 s doubling per failure up to `cap`, times 0.5-1,
    so daemons that lost Redis together do not come back in step."""
    return min(cap, 0.1 * 2 ** min(failures, 6)) * random.uniform(0.5, 1.0)


async def wait_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep `seconds`, or less if `stop` is set meanwhile (a back-off must not hold up a
    shutdown). True: stopped."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True


def worth_logging(failures: int) -> bool:
    """Log the first failure of a run and every 30th after it: no log flood while Redis is down."""
    return failures == 1 or failures % 30 == 0
