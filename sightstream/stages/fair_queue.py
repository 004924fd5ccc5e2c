"""The devices' batch queue, shared by every pipeline, `/predict` and jobs: bounded like an
asyncio.Queue, but when it is full the next place goes to the waiting batch whose pipeline
(its label) has had the least device time lately, not to the batch that waited first.

First come, first served, each pipeline had one batch in line at a time, so a slow model took a
turn as often as a fast one: a 20 ms detector beside a 1 s model got `batch_size` frames per
second of device, 11.6 results/s of the 30 it was sent (p99 26 s, growing) with 2 % of the
device. By device time, the detector's batches are preferred while it uses less of the device
than the slow model, and the slow model gets the places the detector leaves, so neither starves
and both get about equal shares while both have work waiting. (Approximately: a call is charged
when it ends, so the few batches already let in were chosen on older figures; a worker's own
queue, a tracking pipeline's on a daemon with several devices, is served before this one.)

Device time is charged by the workers (`charge`: every call's, failed or timed out too), plus
MIN_CHARGE_S for each batch taken (one that needs no device call, all its frames stale, still
takes a turn), decayed with a half-life of HALF_LIFE_S so that the past weighs less than the
present. STOP (the shutdown's) is let in after every batch waiting."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

HALF_LIFE_S = 10.0
MIN_CHARGE_S = 0.005  # a batch taken costs at least this much


class FairQueue(asyncio.Queue):
    """Every method a stage calls is its own (asyncio.Queue's state is not used): an
    asyncio.Queue wherever one is asked for."""

    def __init__(self, maxsize: int, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(maxsize)  # maxsize <= 0: no bound, as asyncio.Queue
        self._clock = clock
        self._items: deque[Any] = deque()
        self._getters: deque[asyncio.Future] = deque()
        # (label, order, admitted, item) of the batches waiting for a place
        self._putters: list[tuple[str | None, int, asyncio.Future, Any]] = []
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
        return 0 < self.maxsize <= len(self._items)

    def task_done(self) -> None:
        raise NotImplementedError("FairQueue keeps no count of tasks")

    async def join(self) -> None:
        raise NotImplementedError("FairQueue keeps no count of tasks")

    def __repr__(self) -> str:
        return f"<FairQueue maxsize={self.maxsize} items={len(self._items)} waiting={len(self._putters)}>"

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
            else:  # let in meanwhile: taken back, as asyncio.Queue queues no cancelled put's item
                for i, queued in enumerate(self._items):
                    if queued is item:
                        del self._items[i]
                        self._admit()
                        break
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
        if (label := _label(item)) is not None:
            self.charge(label, MIN_CHARGE_S)
        self._admit()
        return item

    def _admit(self) -> None:
        """A place is free: the waiting batch whose label has had the least device time lately
        (of two alike, the one that waited first)."""
        while self._putters and not self.full():
            entry = min(self._putters, key=lambda e: (math.inf if e[0] is None else self.usage(e[0]), e[1]))
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


def _label(item: Any) -> str | None:
    return getattr(item, "pipeline", None)  # STOP has none
