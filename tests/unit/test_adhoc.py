"""Ad-hoc batches (/predict, jobs): per model and prompt, closed at size or timeout; a tracking
model's sources each on one device; lanes that end when idle; frames failed at shutdown."""

from __future__ import annotations

import asyncio
import zlib

import pytest

from sightstream.frames import Frame
from sightstream.prompts import Prompt
from sightstream.stages.adhoc import AdhocBatcher, ShuttingDown
from tests.conftest import wait_for


def frames(*sources: str) -> list[Frame]:
    return [Frame("predict", s, str(i), {}, 0) for i, s in enumerate(sources)]


async def test_frames_of_one_model_and_prompt_share_batches():
    out: asyncio.Queue = asyncio.Queue()
    batcher = AdhocBatcher(out)
    await batcher.put(frames("a", "b", "c"), "m/x", Prompt("cats", 1), "predict", (2, 50))
    await batcher.put(frames("d"), "m/x", Prompt("dogs", 1), "predict", (2, 50))
    batches = [await asyncio.wait_for(out.get(), 1) for _ in range(3)]
    assert sorted((b.prompt.text, len(b.frames)) for b in batches) == [("cats", 1), ("cats", 2), ("dogs", 1)]
    await batcher.close()


async def test_a_tracking_models_sources_each_stay_on_one_device():
    shared: asyncio.Queue = asyncio.Queue()
    own = [asyncio.Queue(), asyncio.Queue()]
    batcher = AdhocBatcher(shared, pinned=own, stateful=lambda model: model == "sam2/track")
    sources = ["u1", "u2", "u3", "u4"]
    await batcher.put(frames(*sources), "sam2/track", Prompt("", 1), "jobs", (8, 20))
    seen: list[str] = []

    async def collect() -> None:
        while len(seen) < len(sources):
            for k, queue in enumerate(own):
                while not queue.empty():
                    batch = queue.get_nowait()
                    assert all(zlib.crc32(f.source.encode()) % 2 == k for f in batch.frames)
                    seen.extend(f.source for f in batch.frames)
            await asyncio.sleep(0.01)

    await asyncio.wait_for(collect(), 2)
    assert sorted(seen) == sources  # every frame arrived, each on its source's device
    assert shared.empty()
    await batcher.close()


async def test_an_idle_lane_ends_and_a_new_one_starts_for_the_next_frame():
    out: asyncio.Queue = asyncio.Queue()
    batcher = AdhocBatcher(out, idle_s=0.05)
    await batcher.put(frames("a"), "m/x", Prompt("", 1), "predict", (8, 1))
    await asyncio.wait_for(out.get(), 1)
    await wait_for(lambda: batcher._lanes == {}, 2, "the idle lane to end")
    await batcher.put(frames("b"), "m/x", Prompt("", 1), "predict", (8, 1))
    assert (await asyncio.wait_for(out.get(), 1)).frames[0].source == "b"
    await batcher.close()


async def test_frames_not_yet_batched_fail_at_shutdown():
    out: asyncio.Queue = asyncio.Queue(1)
    batcher = AdhocBatcher(out)
    futures = await batcher.put(frames("a", "b", "c"), "m/x", Prompt("", 1), "predict", (1, 0))
    await wait_for(lambda: out.full(), 1, "the first batch handed on")
    await batcher.close()
    # "a" went to a worker (it is answered there); "b" waited for a worker, "c" for a batch.
    assert not futures[0].done()
    assert all(isinstance(f.exception(), ShuttingDown) for f in futures[1:])
    late = await batcher.put(frames("d"), "m/x", Prompt("", 1), "predict", (1, 0))
    with pytest.raises(ShuttingDown):
        await late[0]


async def test_a_batch_that_cannot_be_sent_fails_its_callers_and_the_lane_goes_on():
    """A model this daemon does not know (a job taken by a daemon with another config) used to
    end the lane's task: its callers waited for ever."""
    out: asyncio.Queue = asyncio.Queue()

    def stateful(model: str) -> bool:
        if model == "gone/model":
            raise KeyError("unknown model 'gone/model'")
        return False

    batcher = AdhocBatcher(out, pinned=[asyncio.Queue(), asyncio.Queue()], stateful=stateful)
    (refused,) = await batcher.put(frames("a"), "gone/model", Prompt("", 1), "jobs", (1, 1))
    with pytest.raises(KeyError, match="gone/model"):
        await asyncio.wait_for(refused, 2)
    (later,) = await batcher.put(frames("b"), "gone/model", Prompt("", 1), "jobs", (1, 1))
    with pytest.raises(KeyError):  # the same lane still answers
        await asyncio.wait_for(later, 2)
    await batcher.close()
