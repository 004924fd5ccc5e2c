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


def _frame(pipeline: str, n: int):
    from sightstream.frames import Frame

    return Frame(pipeline, "frames:{a}", f"{n}-0", {}, n)


async def test_a_batch_waiting_for_a_place_takes_frames_and_keeps_its_turn():
    """A batch closed at its timeout waits for a place in the devices' queue: it takes the
    frames that come meanwhile (batches were the size of what came during one model call), and
    keeps its place in line, ahead of another pipeline's batch that came after it."""
    from sightstream.config import PipelineSettings
    from sightstream.stages.batcher import Batcher

    out: asyncio.Queue = asyncio.Queue(1)
    out.put_nowait("a batch on its way to a device")  # full
    light_in: asyncio.Queue = asyncio.Queue()
    heavy_in: asyncio.Queue = asyncio.Queue()
    light = Batcher(PipelineSettings(name="light", batch_size=4, batch_timeout_ms=0), light_in, out)
    heavy = Batcher(PipelineSettings(name="heavy", batch_size=4, batch_timeout_ms=0), heavy_in, out)
    light_in.put_nowait(_frame("light", 0))
    tasks = [asyncio.create_task(light.run())]
    await asyncio.sleep(0.01)  # light's batch of one waits for a place
    for n in range(4):
        heavy_in.put_nowait(_frame("heavy", n))
    tasks.append(asyncio.create_task(heavy.run()))
    await asyncio.sleep(0.01)  # heavy's full batch waits behind it
    for n in range(1, 6):  # light's frames meanwhile: three fill its batch, two are the next's
        light_in.put_nowait(_frame("light", n))
    await asyncio.sleep(0.01)
    assert out.get_nowait() == "a batch on its way to a device"
    await asyncio.sleep(0.01)
    first = out.get_nowait()
    assert first.pipeline == "light" and [f.entry_id for f in first.frames] == ["0-0", "1-0", "2-0", "3-0"]
    await asyncio.sleep(0.01)
    assert out.get_nowait().pipeline == "heavy"
    await asyncio.sleep(0.01)
    assert [f.entry_id for f in out.get_nowait().frames] == ["4-0", "5-0"]
    light_in.put_nowait(_frame("light", 6))  # a place is free: queued at once; then STOP ends both
    await asyncio.sleep(0.01)
    light_in.put_nowait(STOP)
    heavy_in.put_nowait(STOP)
    assert [f.entry_id for f in (await asyncio.wait_for(out.get(), 1)).frames] == ["6-0"]
    await asyncio.wait_for(asyncio.gather(*tasks), 1)  # both ended
