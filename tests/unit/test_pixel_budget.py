"""The /predict pixel budget: turns in order, one chunk over the budget alone, and a request
that goes away while waiting passes its turn on."""

from __future__ import annotations

import asyncio

import pytest

from sightstream.control.pixel_budget import PixelBudget


async def holder(budget: PixelBudget, pixels: int, order: list[str], name: str, release: asyncio.Event) -> None:
    async with budget.hold(pixels):
        order.append(name)
        await release.wait()


async def test_turns_come_in_order_and_a_chunk_over_the_budget_runs_alone():
    budget, order, release = PixelBudget(100), [], asyncio.Event()
    tasks = [asyncio.create_task(holder(budget, pixels, order, name, release))
             for name, pixels in (("a", 60), ("big", 500), ("b", 10))]
    await asyncio.sleep(0.01)
    # "b" would fit beside "a" but waits behind "big", which waits to run alone
    assert order == ["a"] and budget.held == 60
    release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 1)
    assert order == ["a", "big", "b"] and budget.held == 0


async def test_a_request_that_goes_away_while_waiting_passes_its_turn_on():
    budget, order, release = PixelBudget(100), [], asyncio.Event()
    first = asyncio.create_task(holder(budget, 90, order, "first", release))
    gone = asyncio.create_task(holder(budget, 50, order, "gone", asyncio.Event()))
    small = asyncio.create_task(holder(budget, 10, order, "small", release))
    await asyncio.sleep(0.01)
    assert order == ["first"]
    gone.cancel()  # its client hung up
    await asyncio.sleep(0.01)
    assert order == ["first", "small"] and budget.held == 100
    release.set()
    await asyncio.wait_for(asyncio.gather(first, small), 1)
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert budget.held == 0
