"""The devices' batch queue: a place goes to the pipeline with the least device time lately."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from sightstream.stages.fair_queue import HALF_LIFE_S, FairQueue


def batch(pipeline: str, n: int) -> SimpleNamespace:
    return SimpleNamespace(pipeline=pipeline, n=n)


async def test_a_free_place_goes_to_the_pipeline_with_the_least_device_time():
    q = FairQueue(1)
    await q.put(batch("slow", 0))
    q.charge("slow", 1.0)
    q.charge("fast", 0.02)
    waiting = [asyncio.create_task(q.put(batch("slow", 1))), asyncio.create_task(q.put(batch("fast", 1)))]
    await asyncio.sleep(0)
    assert [(await q.get()).pipeline for _ in range(3)] == ["slow", "fast", "slow"]  # fast's came later
    await asyncio.gather(*waiting)


async def test_device_time_decays_so_the_past_weighs_less():
    now = [0.0]
    q = FairQueue(1, clock=lambda: now[0])
    q.charge("a", 8.0)
    now[0] += HALF_LIFE_S
    assert q.usage("a") == pytest.approx(4.0)
    q.charge("a", 1.0)
    assert q.usage("a") == pytest.approx(5.0) and q.usage("b") == 0


async def test_a_cancelled_get_or_put_loses_nothing():
    q = FairQueue(1)
    getter = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    getter.cancel()
    await asyncio.sleep(0)
    await q.put(batch("a", 1))
    blocked = asyncio.create_task(q.put(batch("b", 2)))
    await asyncio.sleep(0)
    blocked.cancel()
    await asyncio.sleep(0)
    assert (await q.get()).n == 1 and q.empty()
    q.put_nowait(batch("c", 3))
    with pytest.raises(asyncio.QueueFull):
        q.put_nowait(batch("d", 4))
    assert q.get_nowait().n == 3


async def test_stop_comes_after_every_batch_waiting_and_a_cancelled_put_queues_nothing():
    from sightstream.stages.flow import STOP

    q = FairQueue(1)
    await q.put(batch("a", 0))
    stop = asyncio.create_task(q.put(STOP))
    later = asyncio.create_task(q.put(batch("b", 1)))
    await asyncio.sleep(0)
    assert (await q.get()).n == 0
    assert (await q.get()).n == 1 and await q.get() is STOP  # the batch first, though it came later
    await asyncio.gather(stop, later)
    await q.put(batch("a", 2))
    admitted = asyncio.create_task(q.put(batch("b", 3)))
    await asyncio.sleep(0)
    assert q.get_nowait().n == 2  # b's batch let in …
    admitted.cancel()  # … and its put cancelled before it knew: taken back, as asyncio.Queue does
    await asyncio.gather(admitted, return_exceptions=True)
    assert q.empty()


async def test_a_pipeline_never_charged_still_pays_for_its_turns():
    """Batches that need no device call (all frames stale) or fail at once were charged nothing,
    so their pipeline took every free place ahead of the others."""
    q = FairQueue(1)
    for _ in range(10):
        await q.put(batch("stale", 0))
        q.get_nowait()
    q.charge("busy", 0.02)
    assert q.usage("stale") > q.usage("busy")  # ten turns at MIN_CHARGE_S each
