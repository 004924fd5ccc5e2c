"""Worker: one per device, each with its own single-thread executor, so a device runs one batch
at a time and the event loop never waits on a model. Idle workers pull from one shared batch
queue, so the least busy worker takes the next batch.

A batch whose model call fails is retried frame by frame, so one bad frame does not sink its
batch-mates; frames that still fail are dead-lettered with reason `model_error`.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from sightstream import keys, log
from sightstream.errors import BatchSizeMismatch, ModelError
from sightstream.frames import (
    Acked,
    Batch,
    DeadLettered,
    Frame,
    Outcome,
    Prediction,
    Published,
    is_stale,
    result_fields,
    scale_detections,
)
from sightstream.metrics import Metrics
from sightstream.models.adapter import Adapter
from sightstream.models.manager import ModelManager
from sightstream.stages.flow import STOP

_log = log.get(__name__)


class Worker:
    def __init__(
        self, device: str, manager: ModelManager, inq: asyncio.Queue, outcomes: asyncio.Queue,
        metrics: Metrics,
    ) -> None:
        self.device = device
        self._manager = manager
        self._in, self._outcomes = inq, outcomes
        self._metrics = metrics
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"infer-{device}")
        self.busy = False
        self.batches = 0

    async def run(self) -> None:
        while (batch := await self._in.get()) is not STOP:
            self.busy = True
            try:
                for outcome in await self.process(batch):
                    await self._outcomes.put(outcome)
            finally:
                self.busy = False
                self.batches += 1
        await self._in.put(STOP)  # let sibling workers see it too

    async def process(self, batch: Batch) -> list[Outcome]:
        outcomes: list[Outcome] = []
        frames: list[Frame] = []
        for frame in batch.frames:
            if is_stale(frame, batch.max_age_ms):
                outcomes.append(Acked(frame, "stale"))
            else:
                frames.append(frame)
        if not frames:
            return outcomes
        try:
            adapter = await self._manager.acquire(batch.model, self.device, self.executor)
        except ModelError as e:
            _log.error("model_unavailable", model=batch.model, device=self.device, error=str(e))
            return outcomes + [self._dead(f, "model_error", str(e)) for f in frames]
        task = adapter.task
        try:
            predictions = await self._infer(adapter, batch, frames)
            pairs = list(zip(frames, predictions))
        except Exception as e:  # a model's failure: retry each frame on its own
            _log.warning("batch_failed_retrying_each", pipeline=batch.pipeline, size=len(frames),
                         error=repr(e))
            pairs = []
            for frame in frames:
                try:
                    pairs.append((frame, (await self._infer(adapter, batch, [frame]))[0]))
                except Exception as one:
                    outcomes.append(self._dead(frame, "model_error", f"the model failed: {one!r}"))
        for frame, prediction in pairs:
            _to_original_pixels(frame, prediction)
            fields = result_fields(frame, model=batch.model, task=task, prediction=prediction)
            outcomes.append(
                Published(frame, keys.result_stream(batch.output, frame.pipeline, frame.source), fields)
            )
        return outcomes

    async def _infer(self, adapter: Adapter, batch: Batch, frames: list[Frame]) -> list[Prediction]:
        images = [f.image for f in frames if f.image is not None]  # every frame here is decoded
        started = time.perf_counter()
        predictions = await asyncio.get_running_loop().run_in_executor(
            self.executor, adapter.infer, images, None
        )
        self._metrics.inference_seconds.labels(batch.pipeline, batch.model, self.device).observe(
            time.perf_counter() - started
        )
        if len(predictions) != len(images):
            raise BatchSizeMismatch(
                f"{batch.model} returned {len(predictions)} results for {len(images)} images"
            )
        return predictions

    @staticmethod
    def _dead(frame: Frame, reason: str, error: str) -> DeadLettered:
        return DeadLettered(frame, keys.deadletter_stream(frame.pipeline, frame.source), reason, error)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _to_original_pixels(frame: Frame, prediction: Prediction) -> None:
    """The decoder may have decoded at reduced scale; results speak of the original frame."""
    if frame.image is None:
        return
    h, w = frame.image.shape[:2]
    ow, oh = frame.orig_size
    if (ow, oh) != (w, h) and "detections" in prediction.result:
        scale_detections(prediction.result, ow / w, oh / h, ow, oh)
