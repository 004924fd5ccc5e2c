"""Batches for frames that come from no pipeline's stream: `/predict` uploads and jobs.

Frames are batched per (model, prompt) in a lane of their own, closed at `batch_size` or
`batch_timeout_ms` like a pipeline's batches, and put on the same shared queue the device
workers take from, so a burst of requests is batched and requests share the devices fairly
with the pipelines. A text model's batches (`task = "generate"`) go to the text workers' queue
instead: their calls take minutes on a CPU, and frames must not wait behind them. A lane idle
for `idle_s` ends; the next frame for it starts a new one.

The worker answers each frame on its `reply` future (an Outcome) instead of publishing it.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from sightstream import log
from sightstream.errors import SightstreamError
from sightstream.frames import Batch, Frame, Outcome
from sightstream.prompts import Prompt
from sightstream.stages.batcher import collect_batch

_log = log.get(__name__)


class ShuttingDown(SightstreamError):
    """The daemon stopped before the frame was batched."""


@dataclass(frozen=True)
class Lane:
    queue: asyncio.Queue
    task: asyncio.Task


class AdhocBatcher:
    def __init__(self, out: asyncio.Queue, idle_s: float = 30.0,
                 lane_size: int = 256, pinned: list[asyncio.Queue] | None = None,
                 stateful: Callable[[str], bool] = lambda model: False,
                 text: asyncio.Queue | None = None,
                 writes_text: Callable[[str], bool] = lambda model: False) -> None:
        self._out = out
        self._text, self._writes_text = text, writes_text  # the text workers' queue, and who goes there
        # A model that keeps state per source (tracking) sees each source on one device: a
        # hash of the source picks a worker's own queue, as pipelines' batchers do.
        self._pinned = pinned
        self._stateful = stateful
        self._idle_s = idle_s
        self._lane_size = lane_size
        self._lanes: dict[tuple[str, str, int, str], Lane] = {}
        self._closed = False
        self._unanswered: set[asyncio.Future] = set()  # every reply not yet given

    def keeps_state(self, model: str) -> bool:
        """The model keeps state per source (tracking): its frames must reach it in order."""
        return self._stateful(model)

    async def submit(self, frames: list[Frame], model: str, prompt: Prompt, label: str,
                     batching: tuple[int, float] = (8, 10.0)) -> list[Outcome]:
        """Each frame's outcome, in order. `label` names the frames' origin in batches and
        metrics (predict, jobs); `batching` is (batch_size, batch_timeout_ms) for a new lane.
        Raises the worker's error if the batch was abandoned."""
        return await asyncio.gather(*await self.put(frames, model, prompt, label, batching))

    async def put(self, frames: list[Frame], model: str, prompt: Prompt, label: str,
                  batching: tuple[int, float] = (8, 10.0)) -> list[asyncio.Future[Outcome]]:
        """Queue the frames (waiting while the lane is full); their outcomes come on the
        returned futures."""
        loop = asyncio.get_running_loop()
        key = (model, prompt.text, prompt.version, label)
        futures = []
        for frame in frames:
            frame.reply = loop.create_future()
            futures.append(frame.reply)
            self._unanswered.add(frame.reply)
            frame.reply.add_done_callback(self._unanswered.discard)
            if self._closed:
                self._fail(frame)
                continue
            # Looking the lane up and queueing do not yield while the queue has room, so a lane
            # cannot end between the two (it ends only when its queue is empty).
            await self._lane(key, batching).queue.put(frame)
        return futures

    def _lane(self, key: tuple[str, str, int, str], batching: tuple[int, float]) -> Lane:
        lane = self._lanes.get(key)
        if lane is None or lane.task.done():
            queue: asyncio.Queue = asyncio.Queue(self._lane_size)
            task = asyncio.create_task(self._run(key, queue, *batching), name=f"adhoc-{key[0]}")
            lane = self._lanes[key] = Lane(queue, task)
        return lane

    async def _run(self, key: tuple[str, str, int, str], queue: asyncio.Queue, size: int,
                   timeout_ms: float) -> None:
        model, text, version, label = key
        prompt = Prompt(text, version)
        while True:
            try:
                first = await asyncio.wait_for(queue.get(), self._idle_s)
            except TimeoutError:
                if queue.empty():
                    del self._lanes[key]
                    return
                continue
            await self._batch(queue, first, size, timeout_ms, Batch(label, model, "", 0, [], prompt))
            first = None  # its image is not kept while the lane waits

    async def _batch(self, queue: asyncio.Queue, first: Frame, size: int, timeout_ms: float,
                     batch: Batch) -> None:
        """Gather `first` and what follows it into `batch`, and send it to the workers."""
        batch.frames, _ = await collect_batch(queue, size, timeout_ms / 1000, first=first)
        try:
            await self._send(batch)
        except asyncio.CancelledError:  # shutdown while waiting for a worker: say so
            for frame in batch.frames:
                self._fail(frame)
            raise
        except Exception as e:  # e.g. a model unknown here: its callers are told, the lane goes on
            _log.warning("adhoc_batch_refused", model=batch.model, frames=len(batch.frames), error=str(e))
            for frame in batch.frames:
                self._fail(frame, e)

    async def _send(self, batch: Batch) -> None:
        if self._text is not None and self._writes_text(batch.model):
            await self._text.put(batch)
            return
        if not self._pinned or not self._stateful(batch.model):
            await self._out.put(batch)
            return
        by_worker: dict[int, list[Frame]] = {}
        for frame in batch.frames:
            by_worker.setdefault(zlib.crc32(frame.source.encode()) % len(self._pinned), []).append(frame)
        for k, part in by_worker.items():
            await self._pinned[k].put(Batch(batch.pipeline, batch.model, "", 0, part, batch.prompt))

    async def close(self) -> None:
        """Stop batching: frames not yet in a batch are answered with ShuttingDown."""
        self._closed = True
        lanes, self._lanes = list(self._lanes.values()), {}
        for lane in lanes:
            lane.task.cancel()
        await asyncio.gather(*(lane.task for lane in lanes), return_exceptions=True)
        for lane in lanes:
            while not lane.queue.empty():
                self._fail(lane.queue.get_nowait())

    def answer_the_rest(self) -> None:
        """At stop, once the workers are gone: a reply still owed (a batch abandoned in a worker's
        queue, or on a device thread past the drain) is answered with ShuttingDown, so that its
        caller (a /predict handler) ends and the control plane can close."""
        for reply in list(self._unanswered):
            if not reply.done():
                reply.set_exception(ShuttingDown("the daemon is shutting down"))

    @staticmethod
    def _fail(frame: Frame, error: Exception | None = None) -> None:
        if frame.reply is not None and not frame.reply.done():
            frame.reply.set_exception(error or ShuttingDown("the daemon is shutting down"))
