"""Worker: one per device for frames, and one per device for text. A worker's own
single-thread executor runs nothing but model calls, so it runs one batch at a time, in the
order the batches came, and the event loop never waits on a model. Idle workers pull from one
shared batch queue, so the least busy worker takes the next batch; a worker's own queue holds
the batches that must run on its device (a tracking model's sources, each kept on one device).

Text models (`task = "generate"`: jobs' summaries, `/predict` of text) have workers of their
own (`kind = "text"`) with a queue of their own: one call of theirs takes minutes on a CPU, and
frames, `/predict` of images and jobs' frames must not wait behind it. So a device runs at most
one frames call and one text call at once; on a GPU the two share it, on a CPU the cores.

Several batches are in flight per worker (`depth`: `batches_per_device`, 2 by default, for
frames; 1 for text; bounded): while batch k runs on the device, k+1 is being prepared and k-1
finished in the CPU pool (a staged adapter's `prepare` and `finish`; the result entries'
fields and JSON for every adapter). Outcomes leave in the order the batches came.

When a model call fails:
- out of memory: the batch is halved and each half retried (down to single frames);
- any other error: the batch is retried frame by frame, so one bad frame does not sink its
  batch-mates; a frame that still fails is dead-lettered (`model_error`);
- stuck past `inference_timeout_s` (a model's own `timeout_s` where it has one: a text model
  writing a summary on a CPU takes minutes; counted from when the device starts the call, not
  while it waits behind the batch before it): the batch is abandoned, its frames left pending in Redis
  (another daemon, or this one, reclaims them after `reclaim_min_idle_ms`), and the worker gets
  a fresh executor thread (a thread stuck inside a model cannot be killed). A batch queued
  behind the stuck call is abandoned with it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

from sightstream import keys, log
from sightstream.errors import BatchSizeMismatch, ModelError
from sightstream.frames import (
    Batch,
    DeadLettered,
    Frame,
    Outcome,
    Prediction,
    Published,
    decoded_scale,
    drop_stale,
    result_fields,
    scale_detections,
)
from sightstream.metrics import Metrics
from sightstream.models.adapter import Adapter, FrameContext, is_staged
from sightstream.models.manager import LoadTimeout, ModelManager
from sightstream.stages.fair_queue import FairQueue
from sightstream.stages.flow import STOP

_log = log.get(__name__)
OOM_MARKERS = ("out of memory", "outofmemory", "failed to allocate", "cuda_error_out_of_memory")
STUCK_POLL_S = 1.0  # how often a call queued behind another checks that one was not abandoned


QUEUED_BEHIND = ("{model} did not run: it was queued on a device whose call before it was abandoned past "
                 "its timeout")


class InferenceTimeout(Exception):
    pass


class NotRun(InferenceTimeout):
    """The frames never reached their model: they waited on a device thread that was replaced
    (another call was stuck) or for a load that could not be run. Tried again, they may well
    run: jobs do so, and a pipeline's batch is sent once more on the fresh thread."""


class ModelPaused(NotRun):
    """A pipeline's video input's frames: the pipeline's model cannot be loaded, and the
    pipeline waits for it (daemon/model_pauses.py). The job sends them again once it goes on."""


def is_oom(error: BaseException) -> bool:
    return isinstance(error, MemoryError) or any(m in str(error).lower() for m in OOM_MARKERS)


class Worker:
    def __init__(
        self, device: str, manager: ModelManager, inq: asyncio.Queue, outcomes: asyncio.Queue,
        metrics: Metrics, timeout_s: float = 60.0, *, cpu: Executor | None = None, depth: int = 2,
        kind: str = "frames", on_unloadable: Callable[[str, str, str, Exception], bool] | None = None,
    ) -> None:
        self.device = device
        self.kind = kind  # "frames", or "text": the text models' calls
        self._manager = manager
        self._in, self._outcomes = inq, outcomes
        self._metrics = metrics
        self._timeout_s = timeout_s
        # (pipeline, model, device, error): a pipeline's model cannot be loaded here; True: the
        # daemon paused the pipeline until it can. None or False: the frames are dead-lettered.
        self._on_unloadable = on_unloadable
        self._cpu = cpu  # prepare, finish and result encoding; None: the loop's default pool
        self.depth = depth  # batches in flight on this device
        self.own: asyncio.Queue = asyncio.Queue(2)  # batches for this device only
        self._next: Batch | None = None  # taken from the shared queue while own won the race
        self.executor = self._new_executor()
        self.in_flight = 0  # batches taken and not yet delivered
        self._started = 0
        self.batches = 0
        self.replaced = 0
        self.closed = False  # close(): the daemon stops, nothing is sent to the device again
        # Set once the latest batch's device call was submitted: the next one waits for it,
        # so batches reach the device in the order they came (a tracker's state needs it).
        self._last_turn: asyncio.Future | None = None
        self._timers: dict[tuple[str, ...], Any] = {}  # cached histogram children
        self._host_locks: dict[int, threading.Lock] = {}  # per adapter: prepare and finish

    @property
    def busy(self) -> bool:
        return self.in_flight > 0

    def _new_executor(self) -> ThreadPoolExecutor:
        prefix = "infer" if self.kind == "frames" else self.kind
        return ThreadPoolExecutor(1, thread_name_prefix=f"{prefix}-{self.device}")

    async def run(self) -> None:
        slots = asyncio.Semaphore(self.depth)
        started: asyncio.Queue = asyncio.Queue()  # in batch order; bounded by `slots`
        await asyncio.gather(self._start_all(slots, started), self._deliver_all(slots, started))
        await self._in.put(STOP)  # let sibling workers see it too

    async def _start_all(self, slots: asyncio.Semaphore, started: asyncio.Queue) -> None:
        """Take a batch whenever fewer than `depth` are in flight, and start it."""
        while True:
            await slots.acquire()  # room first: never hold a batch an idle sibling could run
            batch = await self._take()
            if batch is STOP:
                break
            started.put_nowait(self._start(batch))
            batch = None  # its images are not kept while the next one is awaited
        while not self.own.empty():  # STOP comes after the batchers ended: nothing more comes
            started.put_nowait(self._start(self.own.get_nowait()))
            await slots.acquire()
        started.put_nowait(STOP)

    def _start(self, batch: Batch) -> tuple[Batch, asyncio.Task]:
        self.in_flight += 1
        self._started += 1
        batch.id = f"{self.device}/{self._started}" if self.kind == "frames" else \
            f"{self.device}/{self.kind}/{self._started}"
        after, turn = self._last_turn, asyncio.get_running_loop().create_future()
        self._last_turn = turn
        return batch, asyncio.create_task(self.process(batch, after, turn))

    async def _deliver_all(self, slots: asyncio.Semaphore, started: asyncio.Queue) -> None:
        """Hand each batch's outcomes on, in batch order."""
        while (item := await started.get()) is not STOP:
            try:
                await self._deliver(*item)
            finally:
                item = None  # the batch's images are not kept while the device waits for the next
                self.in_flight -= 1
                self.batches += 1
                slots.release()

    async def _deliver(self, batch: Batch, task: asyncio.Task) -> None:
        try:
            outcomes = await task
        except Exception as e:  # a bug: the batch's frames are dead-lettered, the worker goes on
            _log.exception("batch_failed", pipeline=batch.pipeline, model=batch.model,
                           device=self.device, batch=batch.id)
            outcomes = [DeadLettered.of(f, "model_error", f"the batch failed: {e!r}") for f in batch.frames]
        for outcome in outcomes:
            reply = outcome.frame.reply
            if reply is None:
                await self._outcomes.put(outcome)
            else:
                # The outcome points to its frame: without this, frame -> reply -> outcome ->
                # frame is a cycle, and the decoded image waits for the garbage collector.
                outcome.frame.reply = None
                if not reply.done():  # a caller that gave up has cancelled it
                    reply.set_result(outcome)

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

    async def process(
        self, batch: Batch, after: asyncio.Future | None = None, turn: asyncio.Future | None = None
    ) -> list[Outcome]:
        """One batch's outcomes. `after`: set once the batch before this one has used the
        device (or needs it no more): this one waits for it; `turn`: set likewise for this one."""
        outcomes: list[Outcome] = []
        frames = batch.frames
        try:
            async with self._manager.use(batch.model, self.device, self.executor) as adapter:
                timeout_s = self._manager.timeout_s(batch.model, adapter, self._timeout_s)
                # Live mode: checked once the model is ready (a first load can take seconds),
                # so a published result is at most `batches_per_device` calls late.
                frames, outcomes = drop_stale(frames, batch.max_age_ms)
                for f in batch.frames:
                    f.at_device = True
                if batch.taken is not None:
                    batch.taken(len(batch.frames))
                if not frames:
                    return outcomes
                # what the model gets, stale frames left out (counted when the batch closed, it
                # said 8 where the model got 4.5)
                self._metrics.batch_size.labels(batch.pipeline).observe(len(frames))
                task, takes_prompt = adapter.task, adapter.takes_prompt
                try:
                    results = await self._resilient(adapter, batch, frames, timeout_s, after, turn)
                except NotRun:
                    # Queued behind a call that hung (often another pipeline's model): sent once
                    # more, to the fresh thread. Left to the reclaimer, it came reclaim_min_idle_ms
                    # (30 s) late and counted as abandoned, as if this pipeline's model had hung.
                    # The next batch goes meanwhile, so a tracker's (order matters) is left pending
                    # as before, as is any while the daemon stops (its device thread shut, not
                    # replaced); jobs and /predict send theirs again themselves.
                    if self.closed or task == "track" or any(f.reply is not None for f in frames):
                        raise
                    pass_turn(after, turn)
                    _log.warning("batch_sent_again", pipeline=batch.pipeline, model=batch.model,
                                 device=self.device, batch=batch.id, size=len(frames),
                                 reason="queued behind a call abandoned past its timeout")
                    frames, late = drop_stale(frames, batch.max_age_ms)
                    outcomes += late
                    results = await self._resilient(adapter, batch, frames, timeout_s) if frames else []
        except InferenceTimeout as e:  # the whole batch, also parts a split retry finished
            self._hand_back(batch, frames, str(e), not_run=isinstance(e, NotRun))
            return outcomes
        except LoadTimeout as e:  # its frames are retried later, as a stuck call's are
            self._replace_thread(e.executor)
            if not e.not_run and self._unloadable(batch, frames, e):
                return outcomes
            self._hand_back(batch, frames, str(e), not_run=e.not_run)
            return outcomes
        except ModelError as e:  # it cannot be loaded here (no room, bad file)
            _log.error("model_unavailable", model=batch.model, device=self.device, batch=batch.id,
                       error=str(e))
            if self._unloadable(batch, frames, e):
                return outcomes
            return outcomes + [DeadLettered.of(f, "model_error", str(e)) for f in frames]
        except asyncio.CancelledError:
            if (current := asyncio.current_task()) is not None and current.cancelling():
                raise  # this task is being cancelled (shutdown)
            # a load queued on a device thread that was replaced (abandoned): try again later
            self._hand_back(batch, frames, QUEUED_BEHIND.format(model=batch.model), not_run=True)
            return outcomes
        finally:
            pass_turn(after, turn)
        prompt_version = batch.prompt.version if takes_prompt else None
        finished = await asyncio.get_running_loop().run_in_executor(
            self._cpu, _outcomes_of, batch, results, task, prompt_version)
        return outcomes + finished

    async def _resilient(
        self, adapter: Adapter, batch: Batch, frames: list[Frame], timeout_s: float,
        after: asyncio.Future | None = None, turn: asyncio.Future | None = None,
    ) -> list[tuple[Frame, Prediction | BaseException]]:
        """Infer, splitting on failure; each frame ends with a prediction or its own error."""
        try:
            return list(zip(frames, await self._infer(adapter, batch, frames, timeout_s, after, turn)))
        except InferenceTimeout:
            raise
        except Exception as e:
            pass_turn(after, turn)  # the retries below may come after the next batch
            if len(frames) == 1:
                return [(frames[0], e)]
            reason = "oom" if is_oom(e) else "model_error"
            self._metrics.model_retries.labels(batch.pipeline, reason).inc()
            _log.warning("batch_failed_retrying", pipeline=batch.pipeline, device=self.device,
                         batch=batch.id, size=len(frames),
                         reason=reason, error=repr(e))
            if reason == "oom":
                half = len(frames) // 2
                parts = [frames[:half], frames[half:]]
            else:
                parts = [[f] for f in frames]
            out: list[tuple[Frame, Prediction | BaseException]] = []
            for part in parts:
                out += await self._resilient(adapter, batch, part, timeout_s)
            return out

    async def _infer(
        self, adapter: Any, batch: Batch, frames: list[Frame], timeout_s: float,
        after: asyncio.Future | None, turn: asyncio.Future | None,
    ) -> list[Prediction]:
        # the decoded pixels, or a text model's input
        images: list[Any] = [f.image if f.image is not None else f.text for f in frames]
        prompt = batch.prompt if adapter.takes_prompt else None
        contexts = [frame_context(f) for f in frames] if adapter.uses_context else None
        staged = is_staged(adapter)
        if staged:
            prepared = await self._on_host(batch, timeout_s, adapter, adapter.prepare, images, prompt,
                                           contexts)
            call: Callable[[], Any] = lambda: adapter.infer(prepared)  # noqa: E731
        elif contexts is not None:
            call = lambda: adapter.infer(images, prompt, contexts)  # type: ignore[call-arg]  # noqa: E731
        else:
            call = lambda: adapter.infer(images, prompt)  # noqa: E731
        if after is not None:
            await after
        outputs = await self._on_device(call, batch, timeout_s, turn)
        if staged:
            predictions = await self._on_host(batch, timeout_s, adapter, adapter.finish, prepared, outputs)
        else:
            predictions = outputs
        if len(predictions) != len(images):
            raise BatchSizeMismatch(
                f"{batch.model} returned {len(predictions)} results for {len(images)} images"
            )
        return predictions

    async def _on_host(self, batch: Batch, timeout_s: float, adapter: Any, step: Callable[..., Any],
                       *args: Any) -> Any:
        """A staged adapter's prepare or finish, in the CPU pool, bounded like a device call.
        One at a time per adapter: processors and tokenizers are not safe to share between
        threads (a fast tokenizer raises "Already borrowed")."""
        lock = self._host_locks.setdefault(id(adapter), threading.Lock())

        def locked() -> Any:
            with lock:
                return step(*args)

        running = asyncio.get_running_loop().run_in_executor(self._cpu, locked)
        try:
            return await asyncio.wait_for(running, timeout_s)
        except TimeoutError:
            _log.error("host_step_timeout", step=step.__name__, pipeline=batch.pipeline, device=self.device,
                       batch=batch.id, timeout_s=timeout_s)
            raise InferenceTimeout(f"{batch.model}'s {step.__name__} did not finish within its timeout "
                                   f"({timeout_s:g} s)") from None

    async def _on_device(self, call: Callable[[], Any], batch: Batch, timeout_s: float,
                         turn: asyncio.Future | None) -> Any:
        """Run `call` on the device thread, timed out from when the thread starts it."""
        executor = self.executor
        began: list[float] = []

        def timed() -> Any:
            began.append(time.perf_counter())
            return call()

        running = asyncio.get_running_loop().run_in_executor(executor, timed)
        if turn is not None and not turn.done():
            turn.set_result(None)  # submitted: the next batch may queue behind this one
        try:
            return await self._device_result(running, began, executor, batch, timeout_s)
        finally:
            if began and isinstance(self._in, FairQueue):  # the shared queue lets pipelines in by
                # device time: every call's counts, one that failed or was abandoned too
                self._in.charge(batch.pipeline, time.perf_counter() - began[0])

    async def _device_result(self, running: asyncio.Future, began: list[float], executor: Executor,
                             batch: Batch, timeout_s: float) -> Any:
        while not running.done():
            if began:
                wait = began[0] + timeout_s - time.perf_counter()
                if wait <= 0:
                    self._abandon(batch, executor, timeout_s)
                    raise InferenceTimeout(f"{batch.model} did not answer within its timeout "
                                           f"({timeout_s:g} s)")
            elif executor is not self.executor:  # queued behind a call that was abandoned
                running.cancel()
                raise NotRun(QUEUED_BEHIND.format(model=batch.model))
            else:
                wait = min(timeout_s, STUCK_POLL_S)
            await asyncio.wait((running,), timeout=wait)
        if running.cancelled():  # the thread was replaced before it got to this call
            raise NotRun(QUEUED_BEHIND.format(model=batch.model))
        outputs = running.result()
        self._timer(batch).observe(time.perf_counter() - began[0])
        return outputs

    def _timer(self, batch: Batch) -> Any:
        key = (batch.pipeline, batch.model)
        if (child := self._timers.get(key)) is None:
            child = self._timers[key] = self._metrics.inference_seconds.labels(
                batch.pipeline, batch.model, self.device)
        return child

    def _abandon(self, batch: Batch, executor: Executor, timeout_s: float) -> None:
        """A call stuck past the timeout: its thread cannot be killed, so the worker gets a
        fresh one; calls queued behind it are cancelled (their batches are sent again, or
        handed back: process())."""
        _log.error("inference_timeout_abandoning_batch", pipeline=batch.pipeline, model=batch.model,
                   device=self.device, batch=batch.id, timeout_s=timeout_s)
        self._metrics.model_retries.labels(batch.pipeline, "timeout").inc()
        self._replace_thread(executor)

    def _replace_thread(self, executor: Executor | None) -> None:
        """A fresh device thread in place of `executor`'s stuck one (if not replaced already)."""
        if executor is not None and executor is self.executor:
            executor.shutdown(wait=False, cancel_futures=True)
            self.executor = self._new_executor()
            self.replaced += 1

    async def load(self, model: str) -> dict:
        """Load a model on this worker's device (the control plane's POST …/load)."""
        try:
            return await self._manager.load(model, self.device, self.executor)
        except LoadTimeout as e:
            self._replace_thread(e.executor)
            raise

    def _unloadable(self, batch: Batch, frames: list[Frame], error: Exception) -> bool:
        """A pipeline's model could not be loaded: its frames are none of their own fault, so
        the daemon pauses the pipeline (True) rather than dead-letter every frame of every
        camera until the file is mended. Its frames stay pending in Redis (no ack); its video
        inputs' are told ModelPaused. False: not a pipeline's (/predict, a user's job)."""
        if self._on_unloadable is None or not frames:
            return False
        if not self._on_unloadable(batch.pipeline, batch.model, self.device, error):
            return False
        for frame in frames:
            if frame.reply is None:
                frame.release()  # no ack: pending in Redis, read again once the model loads
            elif not frame.reply.done():
                frame.reply.set_exception(ModelPaused(str(error)))
        return True

    def _hand_back(self, batch: Batch, frames: list[Frame], why: str, not_run: bool = False) -> None:
        """Leave the frames of an abandoned batch pending in Redis for a retry (reclaimed once
        idle); callers waiting on a reply (/predict, jobs) are told: NotRun when the frames
        never reached their model."""
        self._metrics.frames_abandoned.labels(batch.pipeline).inc(len(frames))
        for frame in frames:
            if frame.reply is not None:
                if not frame.reply.done():
                    frame.reply.set_exception(NotRun(why) if not_run else InferenceTimeout(why))
                continue
            frame.release()  # no ack: still pending in Redis

    def close(self) -> None:
        self.closed = True
        self.executor.shutdown(wait=False, cancel_futures=True)


def pass_turn(after: asyncio.Future | None, turn: asyncio.Future | None) -> None:
    """This batch is done with the device (or never needed it): the next may go once the one
    before this has gone too, so batches never overtake each other on the device."""
    if turn is None or turn.done():
        return
    if after is None or after.done():
        turn.set_result(None)
    else:
        def follow(_: asyncio.Future) -> None:
            if not turn.done():
                turn.set_result(None)

        after.add_done_callback(follow)


def _outcomes_of(
    batch: Batch, results: list[tuple[Frame, Prediction | BaseException]], task: str,
    prompt_version: int | None,
) -> list[Outcome]:
    """Each frame's result entry (boxes in the frame's own pixels, JSON encoded) or dead-letter
    entry. Runs in the CPU pool: it is the per-frame work of a batch."""
    outcomes: list[Outcome] = []
    for frame, result in results:
        if isinstance(result, BaseException):
            # our own errors are sentences; another's type tells what broke (RuntimeError('…'))
            why = str(result) if isinstance(result, ModelError) else repr(result)
            outcomes.append(DeadLettered.of(frame, "model_error", f"the model failed: {why}"))
            continue
        _to_original_pixels(frame, result)
        try:
            fields = result_fields(frame, model=batch.model, task=task, prediction=result,
                                   prompt_version=prompt_version)
        except (TypeError, ValueError) as e:  # not JSON: the adapter's bug, this frame's outcome
            outcomes.append(DeadLettered.of(frame, "model_error", f"the result cannot be encoded: {e}"))
            continue
        outcomes.append(
            Published(frame, keys.result_stream(batch.output, frame.pipeline, frame.source), fields))
    return outcomes


def frame_context(frame: Frame) -> FrameContext:
    """What a context-using model is told of a frame; upstream boxes in the decoded pixels."""
    detections = frame.detections
    if detections is not None and frame.image is not None:
        h, w = frame.image.shape[:2]
        ow, oh = frame.orig_size
        if (ow, oh) != (w, h) and ow and oh:
            detections = [dict(d) for d in detections]
            sx, sy = decoded_scale((ow, oh), (w, h))
            scale_detections({"detections": detections}, 1 / sx, 1 / sy, w, h)
    return FrameContext(frame.source, frame.ts_ms, detections, frame.generation)


def _to_original_pixels(frame: Frame, prediction: Prediction) -> None:
    """The decoder may have decoded at reduced scale; results speak of the original frame (its
    boxes and landmarks, and its width and height)."""
    if frame.image is None:
        return
    h, w = frame.image.shape[:2]
    ow, oh = frame.orig_size
    if (ow, oh) == (w, h) or not (ow and oh):  # not scaled, or no size known
        return
    if "detections" in prediction.result:
        scale_detections(prediction.result, *decoded_scale((ow, oh), (w, h)), ow, oh)
    elif "width" in prediction.result:
        prediction.result["width"], prediction.result["height"] = ow, oh
