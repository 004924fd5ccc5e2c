"""What every stage shares: the STOP sentinel, in-flight credits, and queue helpers."""

from __future__ import annotations

import asyncio
import random
from typing import Any, Final


class _Stop:
    def __repr__(self) -> str:
        return "STOP"


STOP: Final = _Stop()


class Credits:
    """Bounds the frames a pipeline holds in memory, from read to acknowledgement.

    Ingest takes credits before it reads (so it reads only what there is room for: backlog
    waits in Redis, never here); each frame gives its credit back once acknowledged."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free = capacity
        self._room = asyncio.Event()
        self._room.set()

    async def take(self, most: int) -> int:
        while self._free <= 0:
            self._room.clear()
            await self._room.wait()
        n = min(most, self._free)
        self._free -= n
        return n

    def give(self, n: int = 1) -> None:
        self._free += n
        self._room.set()

    @property
    def in_flight(self) -> int:
        return self.capacity - self._free

    def one(self) -> _OneCredit:
        """A release handle for one frame's credit; calling it twice gives back one credit."""
        return _OneCredit(self)


class _OneCredit:
    __slots__ = ("_credits",)

    def __init__(self, credits: Credits) -> None:
        self._credits: Credits | None = credits

    def __call__(self) -> None:
        if self._credits is not None:
            credits, self._credits = self._credits, None
            credits.give()


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


def worth_logging(failures: int) -> bool:
    """Log the first failure of a run and every 30th after it: no log flood while Redis is down."""
    return failures == 1 or failures % 30 == 0
