"""collect_batch: closes at size or at the timeout after the first frame; time is simulated."""

from __future__ import annotations

import asyncio

from sightstream.stages.batcher import collect_batch
from sightstream.stages.flow import STOP


class FakeTime:
    """A clock that moves only when the batcher waits on an empty queue: each wait either
    finds an item scheduled to arrive within it, or lets the whole wait elapse."""

    def __init__(self, arrivals: list[tuple[float, object]]) -> None:
        self.now = 0.0
        self.arrivals = sorted(arrivals, key=lambda a: a[0])

    def clock(self) -> float:
        return self.now

    async def get_within(self, queue: asyncio.Queue, seconds: float):
        if self.arrivals and self.arrivals[0][0] <= self.now + seconds:
            at, item = self.arrivals.pop(0)
            self.now = max(self.now, at)
            return item
        self.now += seconds
        raise TimeoutError


async def test_closes_at_batch_size_without_waiting():
    q: asyncio.Queue = asyncio.Queue()
    for i in range(10):
        q.put_nowait(i)
    t = FakeTime([])
    items, stopped = await collect_batch(q, 4, 0.010, clock=t.clock, get_within=t.get_within)
    assert items == [0, 1, 2, 3] and not stopped and t.now == 0
    assert q.qsize() == 6


async def test_closes_at_the_timeout_after_the_first_frame():
    q: asyncio.Queue = asyncio.Queue()
    q.put_nowait("a")
    t = FakeTime([(0.004, "b"), (0.009, "c"), (0.015, "late")])
    items, stopped = await collect_batch(q, 8, 0.010, clock=t.clock, get_within=t.get_within)
    assert items == ["a", "b", "c"] and not stopped
    assert abs(t.now - 0.010) < 1e-9  # it waited exactly until the deadline
    assert t.arrivals == [(0.015, "late")]


async def test_zero_timeout_takes_only_what_is_queued():
    q: asyncio.Queue = asyncio.Queue()
    q.put_nowait(1)
    q.put_nowait(2)
    t = FakeTime([(0.001, 3)])
    items, _ = await collect_batch(q, 8, 0.0, clock=t.clock, get_within=t.get_within)
    assert items == [1, 2]


async def test_stop_ends_the_batch_and_is_reported():
    q: asyncio.Queue = asyncio.Queue()
    for item in ("a", "b", STOP):
        q.put_nowait(item)
    items, stopped = await collect_batch(q, 8, 1.0)
    assert items == ["a", "b"] and stopped
    q.put_nowait(STOP)
    assert await collect_batch(q, 8, 1.0) == ([], True)


async def test_waits_for_a_first_frame_however_long():
    q: asyncio.Queue = asyncio.Queue()
    task = asyncio.create_task(collect_batch(q, 2, 0.0))
    await asyncio.sleep(0)
    assert not task.done()
    q.put_nowait("x")
    assert await task == (["x"], False)
