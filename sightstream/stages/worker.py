"""Worker: one per device, each with its own single-thread executor, so a device runs one batch
at a time and the event loop never waits on a model. Idle workers pull from one shared batch
queue, so the least busy worker takes the next batch; a worker's own queue holds the batches
that must run on its device (a tracking model's sources, each kept on one device).

When a model call fails:
- out of memory: the batch is halved and each half retried (down to single frames);
- any other error: the batch is retried frame by frame, so one bad frame does not sink its
  batch-mates; a frame that still fails is dead-lettered (`model_error`);
- stuck past `inference_timeout_s`: the batch is abandoned, its frames left pending in Redis
  (another daemon, or this one, reclaims them after `reclaim_min_idle_ms`), and the worker
  gets a fresh executor thread (a thread stuck inside a model cannot be killed).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

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
from sightstream.models.adapter import Adapter, FrameContext
from sightstream.models.manager import ModelManager
from sightstream.stages.flow import STOP

_log = log.get(__name__)
OOM_MARKERS = ("out of memory", "outofmemory", "failed to allocate", "cuda_error_out_of_memory")


class InferenceTimeout(Exception):
    pass


def is_oom(error: BaseException) -> bool:
    return isinstance(error, MemoryError) or any(m in str(error).lower() for m in OOM_MARKERS)


class Worker:
    def __init__(
        self, device: str, manager: ModelManager, inq: asyncio.Queue, outcomes: asyncio.Queue,
        metrics: Metrics, timeout_s: float = 60.0,
    ) -> None:
        self.device = device
        self._manager = manager
        self._in, self._outcomes = inq, outcomes
        self._metrics = metrics
        self._timeout_s = timeout_s
        self.own: asyncio.Queue = asyncio.Queue(2)  # batches for this device only
        self._next: Batch | None = None  # taken from the shared queue while own won the race
        self.executor = self._new_executor()
        self.busy = False
        self.batches = 0
        self.replaced = 0

    def _new_executor(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(1, thread_name_prefix=f"infer-{self.device}")

    async def run(self) -> None:
        while (batch := await self._take()) is not STOP:
            await self._run(batch)
        while not self.own.empty():  # STOP comes after the batchers ended: nothing more comes
            await self._run(self.own.get_nowait())
        await self._in.put(STOP)  # let sibling workers see it too

    async def _take(self) -> Any:
        """The next batch: this device's own first, else the shared queue's."""
        if self._next is not None:
            batch, self._next = self._next, None
            return batch
        if not self.own.empty():
            return self.own.get_nowait()
        own, shared = asyncio.ensure_future(self.own.get()), asyncio.ensure_future(self._in.get())
        await asyncio.wait((own, shared), return_when=asyncio.FIRST_COMPLETED)
        if own.done() and shared.done():
            self._next = shared.result()
            return own.result()
        for getter in (own, shared):
            if not getter.done():
                getter.cancel()  # asyncio.Queue.get gives up cleanly: no batch is lost
        return own.result() if own.done() else shared.result()

    async def _run(self, batch: Batch) -> None:
        self.busy = True
        try:
            for outcome in await self.process(batch):
                reply = outcome.frame.reply
                if reply is None:
                    await self._outcomes.put(outcome)
                elif not reply.done():  # a caller that gave up has cancelled it
                    reply.set_result(outcome)
        finally:
            self.busy = False
            self.batches += 1

    async def process(self, batch: Batch) -> list[Outcome]:
        outcomes: list[Outcome] = []
        frames = batch.frames
        try:
            async with self._manager.use(batch.model, self.device, self.executor) as adapter:
                # Live mode: checked once the model is ready (a first load can take seconds),
                # right before the call, so a published result is at most one call late.
                stale = [is_stale(f, batch.max_age_ms) for f in frames]  # once: the clock moves
                outcomes = [Acked(f, "stale") for f, old in zip(frames, stale) if old]
                frames = [f for f, old in zip(frames, stale) if not old]
                if not frames:
                    return outcomes
                task, takes_prompt = adapter.task, adapter.takes_prompt
                results = await self._resilient(adapter, batch, frames)
        except InferenceTimeout:
            self._abandon(batch, frames)
            return outcomes
        except ModelError as e:  # it cannot be loaded here (no room, bad file): say why, per frame
            _log.error("model_unavailable", model=batch.model, device=self.device, error=str(e))
            return outcomes + [DeadLettered.of(f, "model_error", str(e)) for f in frames]
        for frame, result in results:
            if isinstance(result, BaseException):
                outcomes.append(DeadLettered.of(frame, "model_error", f"the model failed: {result!r}"))
                continue
            _to_original_pixels(frame, result)
            fields = result_fields(frame, model=batch.model, task=task, prediction=result,
                                   prompt_version=batch.prompt.version if takes_prompt else None)
            outcomes.append(
                Published(frame, keys.result_stream(batch.output, frame.pipeline, frame.source), fields)
            )
        return outcomes

    async def _resilient(
        self, adapter: Adapter, batch: Batch, frames: list[Frame]
    ) -> list[tuple[Frame, Prediction | BaseException]]:
        """Infer, splitting on failure; each frame ends with a prediction or its own error."""
        try:
            return list(zip(frames, await self._infer(adapter, batch, frames)))
        except InferenceTimeout:
            raise
        except Exception as e:
            if len(frames) == 1:
                return [(frames[0], e)]
            reason = "oom" if is_oom(e) else "model_error"
            self._metrics.model_retries.labels(batch.pipeline, reason).inc()
            _log.warning("batch_failed_retrying", pipeline=batch.pipeline, size=len(frames),
                         reason=reason, error=repr(e))
            if reason == "oom":
                half = len(frames) // 2
                parts = [frames[:half], frames[half:]]
            else:
                parts = [[f] for f in frames]
            out: list[tuple[Frame, Prediction | BaseException]] = []
            for part in parts:
                out += await self._resilient(adapter, batch, part)
            return out

    async def _infer(self, adapter: Adapter, batch: Batch, frames: list[Frame]) -> list[Prediction]:
        images = [f.image for f in frames if f.image is not None]  # every frame here is decoded
        started = time.perf_counter()
        prompt = batch.prompt if adapter.takes_prompt else None
        args: tuple = (images, prompt)
        if adapter.uses_context:
            args += ([frame_context(f) for f in frames],)
        call = asyncio.get_running_loop().run_in_executor(self.executor, adapter.infer, *args)
        try:
            predictions = await asyncio.wait_for(call, self._timeout_s)
        except TimeoutError:
            raise InferenceTimeout from None
        self._metrics.inference_seconds.labels(batch.pipeline, batch.model, self.device).observe(
            time.perf_counter() - started
        )
        if len(predictions) != len(images):
            raise BatchSizeMismatch(
                f"{batch.model} returned {len(predictions)} results for {len(images)} images"
            )
        return predictions

    def _abandon(self, batch: Batch, frames: list[Frame]) -> None:
        """Leave a stuck batch's frames pending in Redis for a retry, and replace the thread."""
        _log.error("inference_timeout_abandoning_batch", pipeline=batch.pipeline, model=batch.model,
                   device=self.device, frames=len(frames), timeout_s=self._timeout_s)
        self._metrics.model_retries.labels(batch.pipeline, "timeout").inc()
        self._metrics.frames_abandoned.labels(batch.pipeline).inc(len(frames))
        for frame in frames:
            if frame.reply is not None:
                if not frame.reply.done():
                    frame.reply.set_exception(InferenceTimeout(
                        f"{batch.model} did not answer within inference_timeout_s ({self._timeout_s} s)"))
                continue
            frame.release()  # no ack: still pending in Redis, reclaimed once idle
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.executor = self._new_executor()
        self.replaced += 1

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def frame_context(frame: Frame) -> FrameContext:
    """What a context-using model is told of a frame; upstream boxes in the decoded pixels."""
    detections = frame.detections
    if detections is not None and frame.image is not None:
        h, w = frame.image.shape[:2]
        ow, oh = frame.orig_size
        if (ow, oh) != (w, h) and ow and oh:
            detections = [dict(d) for d in detections]
            scale_detections({"detections": detections}, w / ow, h / oh, w, h)
    return FrameContext(frame.source, frame.ts_ms, detections, frame.generation)


def _to_original_pixels(frame: Frame, prediction: Prediction) -> None:
    """The decoder may have decoded at reduced scale; results speak of the original frame."""
    if frame.image is None:
        return
    h, w = frame.image.shape[:2]
    ow, oh = frame.orig_size
    if (ow, oh) != (w, h) and "detections" in prediction.result:
        scale_detections(prediction.result, ow / w, oh / h, ow, oh)
