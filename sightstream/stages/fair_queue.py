"""The devices' batch queue, shared by every pipeline, `/predict` and jobs: bounded like an
asyncio.Queue, but when it is full the next place goes to the waiting batch whose pipeline
(its label) has had the least device time lately, not to the batch that waited first.

First come, first served, each pipeline had one batch in line at a time, so a slow model took a
turn as often as a fast one: a 20 ms detector beside a 1 s model got `batch_size` frames per
second of device, 11.6 results/s of the 30 it was sent (p99 26 s, growing) with 2 % of the
device. By device time, the detector's batches go first while it uses less of the device than
the slow model, and the slow model still gets every place the detector leaves, so neither
starves: each gets at least an equal share of the device when both have work waiting.

Device time is charged by the workers (`charge`), decayed with a half-life of HALF_LIFE_S so
that the past weighs less than the present."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

HALF_LIFE_S = 10.0


class FairQueue(asyncio.Queue):
    """Every method a stage calls is its own (asyncio.Queue's state is not used): an
    asyncio.Queue wherever one is asked for."""

    def __init__(self, maxsize: int, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(maxsize)
        self._clock = clock
        self._items: deque[Any] = deque()
        self._getters: deque[asyncio.Future] = deque()
        self._putters: list[tuple[str, int, asyncio.Future, Any]] = []  # (label, order, admitted, item)
        self._order = itertools.count()
        self._used: dict[str, tuple[float, float]] = {}  # label -> (decayed device seconds, when)

    def charge(self, label: str, seconds: float) -> None:
        """`label`'s batch used the device `seconds`."""
        self._used[label] = (self.usage(label) + seconds, self._clock())

    def usage(self, label: str) -> float:
        used, when = self._used.get(label, (0.0, 0.0))
        return used * math.exp2(-(self._clock() - when) / HALF_LIFE_S) if used else 0.0

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return len(self._items) >= self.maxsize

    def put_nowait(self, item: Any) -> None:
        if self.full() or self._putters:
            raise asyncio.QueueFull
        self._append(item)

    async def put(self, item: Any) -> None:
        if not self.full() and not self._putters:
            self._append(item)
            return
        admitted = asyncio.get_running_loop().create_future()
        entry = (_label(item), next(self._order), admitted, item)
        self._putters.append(entry)
        try:
            await admitted
        except asyncio.CancelledError:
            if entry in self._putters:  # not admitted: it leaves the line, nothing queued
                self._putters.remove(entry)
            raise

    async def get(self) -> Any:
        while not self._items:
            waiting = asyncio.get_running_loop().create_future()
            self._getters.append(waiting)
            try:
                await waiting
            except asyncio.CancelledError:
                if waiting in self._getters:
                    self._getters.remove(waiting)
                elif self._items:  # woken, then cancelled: the item goes to the next getter
                    self._wake_getter()
                raise
        return self.get_nowait()

    def get_nowait(self) -> Any:
        if not self._items:
            raise asyncio.QueueEmpty
        item = self._items.popleft()
        self._admit()
        return item

    def _admit(self) -> None:
        """A place is free: the waiting batch whose label has had the least device time lately
        (of two alike, the one that waited first)."""
        while self._putters and not self.full():
            entry = min(self._putters, key=lambda e: (self.usage(e[0]), e[1]))
            self._putters.remove(entry)
            self._append(entry[3])
            if not entry[2].done():
                entry[2].set_result(None)

    def _append(self, item: Any) -> None:
        self._items.append(item)
        self._wake_getter()

    def _wake_getter(self) -> None:
        while self._getters:
            waiting = self._getters.popleft()
            if not waiting.done():
                waiting.set_result(None)
                return


def _label(item: Any) -> str:
    return getattr(item, "pipeline", "")  # STOP has none: it is charged nothing, let in first
