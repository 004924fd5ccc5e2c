"""Batcher: one per pipeline. A batch closes at `batch_size` frames or `batch_timeout_ms`
after its first frame, whichever comes first, then waits in line for a place in the shared,
bounded batch queue (idle workers pull from it: the least busy takes the next batch; a place
goes to the pipeline with the least device time lately: stages/fair_queue.py); while it
waits, it takes the frames that come meanwhile, up to `batch_size`.

A pipeline whose model keeps state per source (tracking) on a daemon with several devices
sends each source to one device, always the same (a hash of the source picks the worker's
own queue), so the state it builds there sees all the source's frames."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

from sightstream.config import PipelineSettings
from sightstream.frames import Batch, Frame
from sightstream.prompts import Prompt
from sightstream.stages.flow import STOP
from sightstream.stages.queue_wait import QueueWait


async def _get_within(queue: asyncio.Queue, seconds: float) -> Any:
    return await asyncio.wait_for(queue.get(), seconds)


async def collect_batch(
    queue: asyncio.Queue,
    size: int,
    timeout_s: float,
    *,
    clock: Callable[[], float] | None = None,
    get_within: Callable[[asyncio.Queue, float], Awaitable[Any]] = _get_within,
    first: Any = None,
) -> tuple[list[Frame], bool]:
    """Wait for a first item (unless given), then gather until `size` items or `timeout_s`
    after the first.

    Returns (items, stopped); STOP ends the batch early and is reported, not returned. `clock`
    and `get_within` are injectable so tests can drive time without sleeping."""
    if first is None:
        first = await queue.get()
    if first is STOP:
        return [], True
    now = clock or asyncio.get_running_loop().time
    deadline = now() + timeout_s
    items = [first]
    while len(items) < size:
        try:
            item = queue.get_nowait()  # what is already queued costs no timer
        except asyncio.QueueEmpty:
            remaining = deadline - now()
            if remaining <= 0:
                break
            try:
                item = await get_within(queue, remaining)
            except TimeoutError:
                break
        if item is STOP:
            return items, True
        items.append(item)
    return items, False


class Batcher:
    def __init__(
        self, pipeline: PipelineSettings, inq: asyncio.Queue, out: asyncio.Queue,
        pinned: list[asyncio.Queue] | None = None, prompt: Callable[[], Prompt] | None = None,
        waits: QueueWait | None = None,
    ) -> None:
        self._p = pipeline
        # The pipeline's current prompt (a PromptBook's view); the configured one by default.
        self._prompt = prompt or (lambda: Prompt(pipeline.prompt, 1))
        self._in, self._out = inq, out
        self._pinned = pinned  # one queue per worker, for per-source placement
        self._waits = waits  # live mode: told when the device takes each batch

    async def run(self) -> None:
        timeout_s = self._p.batch_timeout_ms / 1000
        stopped = False
        first: Any = None  # a frame that came as the last batch was queued: the next one's first
        while not stopped:
            frames, stopped = await collect_batch(self._in, self._p.batch_size, timeout_s, first=first)
            first = None
            if frames:
                if self._pinned is None:
                    first, stopped_filling = await self._queue_filling(self._batch(frames), stopped)
                    stopped = stopped or stopped_filling
                    continue
                by_worker: dict[int, list[Frame]] = {}
                for frame in frames:
                    k = zlib.crc32(frame.source.encode()) % len(self._pinned)
                    by_worker.setdefault(k, []).append(frame)
                for k, part in by_worker.items():
                    await self._pinned[k].put(self._batch(part))

    async def _queue_filling(self, batch: Batch, stopped: bool) -> tuple[Any, bool]:
        """Queue `batch` for the devices, keeping its place in line; while it waits for one, it
        takes the frames that come meanwhile, up to batch_size. Closed at its timeout and
        queued, batches stayed the size of what arrived during one model call (3.3 of 8, with
        17 frames waiting: a model able to do more saturated). Returns a frame that came just
        as the batch was queued (the next batch's first), and whether STOP came."""
        queued = asyncio.ensure_future(self._out.put(batch))
        while not stopped and not queued.done() and len(batch.frames) < self._p.batch_size:
            got = asyncio.ensure_future(self._in.get())
            await asyncio.wait({queued, got}, return_when=asyncio.FIRST_COMPLETED)
            if not got.done():
                got.cancel()
                break  # queued
            item = got.result()
            if item is STOP:
                stopped = True
            elif queued.done():
                await queued
                return item, False  # too late for this batch
            else:
                batch.frames.append(item)
        await queued
        return None, stopped

    def _batch(self, frames: list[Frame]) -> Batch:
        p = self._p
        return Batch(p.name, p.model, p.output, p.max_age_ms, frames, self._prompt(),
                     taken=self._waits.taken if self._waits else None)
