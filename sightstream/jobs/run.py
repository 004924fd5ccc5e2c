"""One job on this daemon, from its start to its end: frames are read from the source (a video
through stages/video_reader.py, or a Redis stream), go through the same ad-hoc batches and
device workers as /predict, and their outcomes are published in read order, each by a script
fenced by the job's lease token, which also moves the checkpoint (sequence number and
position) in the same step. Jobs publish through that script, not the pipelines' Publisher:
there is no stream entry to acknowledge, and the fence is what keeps one writer per job.

Resuming after another daemon died: a video is read again after the checkpoint's position
(a VOD seeks there; a live stream goes on from now, skipping what it already reported), a
stream after the checkpoint's entry ID. A result at or below the checkpoint is refused by the
script, so none is reported twice; everything after it is read again, so none is lost.

Beside the reading, a watch runs every half second: it writes progress (fenced: a lost lease
or a cancel stops the job within that time even with no frame coming), ends a stream job at
`max_seconds`, and fails a user's job whose video source gave no frame for `jobs.give_up_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from sightstream import log
from sightstream.config import DecodeSettings, JobSettings
from sightstream.errors import FrameError, SightstreamError
from sightstream.frames import DeadLettered, Frame, Outcome, Published, deadletter_fields, entry_ms, now_ms
from sightstream.jobs.sources import Source, allowed_roots
from sightstream.jobs.store import Job, JobStore, now_iso
from sightstream.metrics import JOBS_LABEL, Metrics
from sightstream.prompts import Prompt
from sightstream.redis_conn import out_of_memory, run_pipelined
from sightstream.stages.adhoc import AdhocBatcher, ShuttingDown
from sightstream.stages.decoder import decode_frame
from sightstream.stages.flow import backoff_s, worth_logging
from sightstream.stages.sampler import bucket_of
from sightstream.stages.video_reader import ReaderOptions, VideoSource, VideoSourceError
from sightstream.stages.worker import InferenceTimeout, ModelPaused, NotRun

_log = log.get(__name__)
WATCH_EVERY_S = 0.5
READ_LIMIT_S = 3.0  # a stream read blocks 1 s; past this it is given up and the job's state checked
STREAM_BUCKETS_S = 120.0  # how long a redis:// source's job remembers a capture-time bucket taken
STREAM_BUCKETS_KEPT = 4096  # and how many at most
PAUSE_LOOK_S = 0.5  # a paused pipeline's video input looks this often whether it goes on
NOT_RUN_TRIES = 3  # a frame that never reached its model (a stuck call on its device) is sent this often
END: Any = object()  # the reader's last word to the publishing task


class JobStopped(SightstreamError):
    """The job must stop here: its lease is lost (`lease_lost`), or it is no longer running
    (cancelled), or the daemon stops."""

    def __init__(self, message: str, *, lease_lost: bool = False) -> None:
        super().__init__(message)
        self.lease_lost = lease_lost


def fenced(reply: int) -> int:
    """A fenced script's reply (jobs/store.py), passed on; -1 (the lease is lost) and -2 (the job
    is no longer running) raise JobStopped."""
    if reply == -1:
        raise JobStopped("the job's lease was lost: another daemon holds it now", lease_lost=True)
    if reply == -2:
        raise JobStopped("the job is no longer running (cancelled)")
    return reply


class JobFailed(SightstreamError):
    """The job cannot go on; its one sentence becomes the job's `error`."""


@dataclass
class Item:
    """A frame read from the source, with where it was read from (the checkpoint's position)."""

    frame: Frame | None  # None: dead-lettered before inference (`error`)
    position: str
    pts_s: float | None = None
    error: FrameError | None = None
    thumbnail: Any = None  # a pipeline input's frame, small, for the live page (InputViews)


THUMBNAIL_SIDE = 960  # pixels: what the live page draws a tile at, at most


@dataclass(frozen=True)
class InputViews:
    """What a pipeline's video input tells the daemon's own views of its pipelines (the live
    page, /sources, `sightstream status`, latency), as the stream publisher does for streams."""

    read: Callable[[str, str, int], None]  # (pipeline, source, frames)
    published: Callable[[Frame, dict[str, Any], int], None]  # (frame, fields, latency ms)
    dead_lettered: Callable[[Frame], None]
    # (pipeline): why it waits for its model (daemon/model_pauses.py), or None
    paused: Callable[[str], str | None] = lambda _: None


@dataclass(frozen=True)
class Limits:
    """How this run batches and publishes: the jobs' settings, or a pipeline's for its inputs."""

    batch_size: int
    batch_timeout_ms: float
    result_maxlen: int


class JobRun:
    def __init__(self, job: Job, source: Source, store: JobStore, token: str, client: Redis,
                 reader: Redis, adhoc: AdhocBatcher, decode_pool: Executor, settings: JobSettings,
                 decode: DecodeSettings, metrics: Metrics, prompt: Callable[[], Prompt] | None = None,
                 limits: Limits | None = None, views: InputViews | None = None) -> None:
        self.job = job
        # A user's job keeps its prompt; a pipeline's video input follows the pipeline's.
        self._prompt = prompt or (lambda: Prompt(job.spec.prompt, 1))
        self._label = job.spec.pipeline or JOBS_LABEL
        self._shown = job.spec.shown  # results name it without its password
        self._views = views
        self._limits = limits or Limits(settings.batch_size, settings.batch_timeout_ms,
                                        settings.result_maxlen)
        self._source = source
        self._store = store
        self._token = token
        self._client, self._reader = client, reader
        self._adhoc = adhoc
        self._decode_pool = decode_pool
        self._s = settings
        self._decode = decode
        self._metrics = metrics
        self._video: VideoSource | None = None
        self._outcomes: set[asyncio.Task] = set()  # frames being resent after NotRun
        self._seq = job.last_seq
        self._started = time.monotonic()
        self._started_wall = _epoch_s(job.started_at) or time.time()  # this job's, over attempts
        self._last_item = time.monotonic()
        self._last_frame_at: str | None = None  # when the source last gave a frame (ISO, UTC)
        # False while the read loop is held back by this job's own work (frames in flight, a
        # device busy with a long call, e.g. a text model's summary): that is no silent source
        self._reading = True
        self._read_to_end = False
        self._waited_s = 0.0  # blocked on the model: the head result not in yet
        self._base = dict(job.timings)  # earlier attempts' timings
        self._counts = {name: int(job.counts.get(name, 0)) for name in ("decoded", "sampled")}
        self._progress_failures = 0  # progress writes failed in a row (Redis at maxmemory, away)
        self._position_s: float | None = None
        self._done = False  # stop reading: a limit, a failure, a stop
        self._watching = True  # the watch goes on (a flag too: a library may swallow its cancel)
        self._failure: str | None = None
        self._read_timeouts = 0  # stream reads given up (logged on the first and every 30th)
        self._stopped: JobStopped | None = None

    @property
    def is_live(self) -> bool:
        """Its video source turned out live (HLS with no end): known once it is opened."""
        return self._video is not None and bool(self._video.stats.is_live)

    async def run(self) -> None:
        """Read, infer and publish until the source ends or a limit is reached. Raises
        JobStopped, JobFailed and VideoSourceError."""
        watch = asyncio.create_task(self._watch(), name=f"job-watch-{self.job.id}")
        try:
            await self._consume()
        except (asyncio.CancelledError, VideoSourceError):  # cancelled (DELETE), stopping; the source failed
            await self._last_progress()
            raise
        finally:
            # The flag as well as the cancel: a cancel that lands in a Redis call may be lost
            # (seen once in 700 jobs: a finished job stayed "running", its watch writing on).
            self._watching = False
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
            if self._video is not None:
                self._video.stop()
        if self._stopped is not None:
            await self._last_progress()
            raise self._stopped
        if self._failure is not None:
            await self._last_progress()  # what it read before it failed
            raise JobFailed(self._failure)
        await self._write_progress()

    async def _consume(self) -> None:
        """Read and submit; a task of its own publishes the outcomes in read order as soon as
        they are in (the queue bounds the frames in flight)."""
        queue: asyncio.Queue = asyncio.Queue(self._s.max_in_flight)
        publishing = asyncio.create_task(self._publish_in_order(queue), name=f"job-publish-{self.job.id}")
        limit = self.job.spec.max_frames
        try:
            # resumed at its limit (its daemon died before it was marked complete): read nothing,
            # as a quiet stream would not send the entry that finds the limit
            reading = limit is None or self._seq < limit
            async for item in self._items() if reading else _nothing():
                self._reading = False
                if self._done or self._limit_reached(item):
                    break
                self._seq += 1
                self._metrics.frames_in.labels(self._label).inc()
                if self._views is not None:
                    self._views.read(self._label, self._shown, 1)
                future: asyncio.Future | None = None
                if item.frame is not None:
                    (first,) = await self._submit(item.frame)  # waits while the lane is full
                    future = asyncio.ensure_future(self._outcome(item.frame, first))
                    self._outcomes.add(future)
                    future.add_done_callback(self._outcomes.discard)
                if not await _put(queue, (self._seq, item, future), publishing):
                    break
                self._last_item, self._reading = time.monotonic(), True
                self._last_frame_at = now_iso()
                if limit is not None and self._seq >= limit:
                    break  # now: a quiet stream may send no next entry to find the limit with
            else:
                self._read_to_end = reading and not self._done  # the source ended: all of it was read
            self._reading = False  # what is left is the job's own work, not a silent source
            await _put(queue, END, publishing)
            await publishing  # raises what ended it early (Redis down: the job is paused, retried)
        finally:
            publishing.cancel()
            for outcome in list(self._outcomes):  # a job ended early: frames are not resent for it
                outcome.cancel()

    async def _submit(self, frame: Frame) -> list[asyncio.Future[Outcome]]:
        return await self._adhoc.put([frame], self.job.spec.model, self._prompt(), self._label,
                                     (self._limits.batch_size, self._limits.batch_timeout_ms))

    async def _outcome(self, frame: Frame, first: asyncio.Future[Outcome]) -> Outcome:
        """The frame's outcome; a frame that never reached the model (another call was stuck on
        its device) is sent again, up to NOT_RUN_TRIES sends in all, not dead-lettered for
        another's fault. Not for a tracker: a frame sent again would reach it after later ones."""
        future, sends = first, 1
        while True:
            try:
                return await future
            except ModelPaused:
                # The pipeline waits for its model: so does its video input's frame, sent again
                # once it goes on (its camera's frames were dead-lettered model_error meanwhile).
                # Not a tracker's: frames sent again would reach it out of order.
                if self._views is None or self._adhoc.keeps_state(self.job.spec.model):
                    raise
                while self._views.paused(self._label) and not self._done:
                    await asyncio.sleep(PAUSE_LOOK_S)
                if self._done:
                    raise
                (future,) = await self._submit(frame)
            except NotRun:
                if sends == NOT_RUN_TRIES or self._done or self._adhoc.keeps_state(self.job.spec.model):
                    raise
                _log.info("job_frame_sent_again", job=self.job.id, frame=frame.entry_id, attempt=sends)
                (future,) = await self._submit(frame)
                sends += 1

    async def _publish_in_order(self, queue: asyncio.Queue) -> None:
        """Publish each outcome once it and those before it are in, several in one round when
        they are. A refused write, a lost lease or a cancel ends the reading; the queue is then
        drained so the reader never waits on it."""
        held: Any = None  # taken from the queue, not ready yet: the head of the next round
        try:
            while (entry := held or await queue.get()) is not END:
                held = None
                head = entry[2]
                if head is not None and not head.done():
                    waited = time.monotonic()
                    await asyncio.wait([head])
                    self._waited_s += time.monotonic() - waited
                ready = [entry]
                while len(ready) < 256 and not queue.empty():
                    nxt = queue.get_nowait()
                    if nxt is END or (nxt[2] is not None and not nxt[2].done()):
                        held = nxt
                        break
                    ready.append(nxt)
                await self._publish(ready)
            return
        except JobStopped as e:
            self._stopped = e
        except JobFailed as e:
            self._failure = str(e)
        self._end_reading()
        while held is not END:
            held = await queue.get()

    def _end_reading(self) -> None:
        self._done = True
        if self._video is not None:
            self._video.stop()

    async def _watch(self) -> None:
        spec = self.job.spec
        while True:
            await asyncio.sleep(WATCH_EVERY_S)
            if not self._watching:
                return
            try:
                await self._write_progress()
                self._progress_failures = 0
            except JobStopped as e:
                self._stopped = e
                self._end_reading()
                return
            except RedisError as e:  # Redis at maxmemory, or unreachable: written at the next tick
                # (a refusal ended this task: the job's counts and timings stayed frozen for good)
                self._progress_failures += 1
                if out_of_memory(e):
                    self._metrics.redis_out_of_memory()
                if worth_logging(self._progress_failures):
                    _log.warning("job_progress_not_written", job=self.job.id, error=str(e),
                                 failures=self._progress_failures)
            idle = time.monotonic() - self._last_item if self._reading else 0.0
            if self._source.is_stream:
                if spec.max_seconds is not None and time.time() - self._started_wall > spec.max_seconds:
                    self._end_reading()
            elif not spec.pipeline and idle > self._s.give_up_s:
                why = self._video.stats.last_error if self._video else None
                self._failure = (f"no frame from the source for {self._s.give_up_s:g} s"
                                 + (f": {why}" if why else ""))
                self._end_reading()

    def _limit_reached(self, item: Item) -> bool:
        spec = self.job.spec
        if spec.max_seconds is not None and item.pts_s is not None:
            return item.pts_s >= spec.max_seconds  # 2 s of video: frames at 0 to 1.9 s, at 10 fps
        return False

    async def _items(self) -> AsyncIterator[Item]:
        if self._source.is_stream:
            async for item in self._stream_items():
                yield item
            return
        options = ReaderOptions(
            fps=self.job.spec.fps, open_timeout_s=self._s.open_timeout_s,
            read_timeout_s=self._s.read_timeout_s, stall_s=self._s.stall_s,
            max_pixels=self._decode.max_pixels, thumbnail_side=THUMBNAIL_SIDE if self._views else 0,
            # an API job's file stays under allowed_paths, each time it is opened (a pipeline's
            # own inputs are the operator's)
            confine_to=allowed_roots(self._s) if self._source.url.lower().startswith("file://")
            and not self.job.spec.pipeline else (),
            follow_redirects=not self._s.allowed_hosts or bool(self.job.spec.pipeline))
        # A pipeline's camera that is down is retried until it is back; a file on this disk
        # says the same each time: one that is not a video fails, as a job's does.
        if self.job.spec.pipeline and not self.job.spec.source.lower().startswith("file://"):
            options = replace(options, max_open_failures=2**31, max_vod_failures=2**31)
        self._video = video = VideoSource(self._source.location, options)
        after = float(self.job.last_position) if self.job.last_position else None
        origin = float(self.job.origin) if self.job.origin else None
        async for vf in video.frames(after_s=after, origin_s=origin):
            if not self.job.origin and video.stats.origin_s is not None:
                self.job.origin = str(video.stats.origin_s)
                await self._fenced_progress({"origin": self.job.origin})
            self._position_s = vf.pts_s
            h, w = vf.image.shape[:2]
            frame = Frame(self._label, self._shown, str(vf.index), {}, now_ms(), image=vf.image,
                          orig_size=(w, h))
            yield Item(frame, repr(vf.pts_s), vf.pts_s, thumbnail=vf.thumbnail)

    async def _stream_items(self) -> AsyncIterator[Item]:
        """A Redis stream's entries after the checkpoint (from now, on the first start),
        sampled to `fps` by capture time, decoded in the decode pool."""
        key = self._source.location
        try:
            last = self.job.last_position or await self._stream_end(key)
            # the capture-time buckets taken in the last STREAM_BUCKETS_S, as pipelines' sampling
            # keys last: a frame whose ts comes out of order (two producers) is not taken again
            # in a bucket already served (only the last one was compared: twice the fps with
            # pairwise swapped ts), and a clock stepped back waits out that long at most
            taken: OrderedDict[int, float] = OrderedDict()  # bucket -> when taken (monotonic)
            loop = asyncio.get_running_loop()
            while not self._done:
                # Bounded: a read that never answers must not hold the job past its end or a
                # cancel. (asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel.)
                try:
                    async with asyncio.timeout(READ_LIMIT_S):
                        reply: Any = await self._reader.xread({key: last}, count=self._s.max_in_flight,
                                                              block=1000)
                except TimeoutError:
                    self._read_timeouts += 1
                    if worth_logging(self._read_timeouts):
                        _log.warning("stream_read_timed_out", job=self.job.id, source=key,
                                     limit_s=READ_LIMIT_S, times=self._read_timeouts)
                    continue
                for _, entries in reply or []:
                    for raw_id, fields in entries:
                        last = raw_id.decode()
                        frame = Frame(self._label, key, last, fields, entry_ms(last))
                        self._counts["decoded"] += 1
                        try:
                            frame.parse_fields()
                        except FrameError as e:
                            yield Item(None, last, error=e)
                            continue
                        now = time.monotonic()
                        while taken and (next(iter(taken.values())) < now - STREAM_BUCKETS_S
                                         or len(taken) > STREAM_BUCKETS_KEPT):
                            taken.popitem(last=False)
                        bucket = bucket_of(frame.ts_ms, self.job.spec.fps)
                        if bucket in taken:
                            continue
                        taken[bucket] = now
                        try:
                            frame.image, frame.orig_size = await loop.run_in_executor(
                                self._decode_pool, decode_frame, frame.fields, self._decode.max_pixels, None)
                        except FrameError as e:
                            yield Item(None, last, error=e)
                            continue
                        frame.fields = {}
                        self._counts["sampled"] += 1
                        yield Item(frame, last)
        except ResponseError as e:  # e.g. the key holds another type now
            raise JobFailed(f"the stream {key} cannot be read: {e}") from None

    async def _stream_end(self, key: str) -> str:
        """The stream's last entry ID now (a new job reads from now on)."""
        if not await self._client.exists(key):
            return "0-0"
        info: Any = await self._client.xinfo_stream(key)
        raw = info.get("last-generated-id", b"0-0")
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    async def _publish(self, ready: list[tuple[int, Item, asyncio.Future[Outcome] | None]]) -> None:
        job = self.job
        entries = [(seq, item.position, *self._entry(item, future)) for seq, item, future in ready]
        waits = 0
        while True:
            written = await self._publish_entries(entries, ready)
            if written == len(entries):
                break
            # Redis at maxmemory refused the rest: it passes once memory is freed, so they wait
            # (the job failed: a video input's results were lost for a short spell of OOM)
            entries, ready = entries[written:], ready[written:]
            waits += 1
            self._metrics.redis_out_of_memory()
            if worth_logging(waits):
                _log.warning("redis_out_of_memory", job=job.id, waits=waits,
                             consequence="the job's results wait until Redis has room")
            await asyncio.sleep(backoff_s(waits))
        job.last_seq, job.last_position = ready[-1][0], ready[-1][1].position

    async def _publish_entries(self, entries: list, ready: list) -> int:
        """Write the entries in one round; how many were written before Redis refused one for
        want of memory (all: none was). Raises JobFailed for any other refusal."""
        job = self.job

        def fill(pipe: Any) -> None:
            for seq, position, stream, counter, fields, _ in entries:
                maxlen = self._limits.result_maxlen if counter == "processed" else 0
                self._store.queue_publish(pipe, job.id, self._token, seq, position, stream, maxlen, counter,
                                          fields)

        replies = await run_pipelined(self._client, fill, self._store.publish_script, raise_on_error=False)
        for index, ((_, _, stream, counter, fields, frame), reply, (_, item, _)) in enumerate(
                zip(entries, replies, ready)):
            if isinstance(reply, ResponseError):  # nothing of this item (or after it) was written
                if out_of_memory(reply):
                    return index
                raise JobFailed(f"results cannot be written to {stream}: {str(reply).split(' script: ')[0]}")
            if fenced(reply) == 1 and counter == "processed":
                self._metrics.frames_published.labels(self._label).inc()
                if self._views is not None:
                    if item.thumbnail is not None:  # the page keeps it, not the whole frame
                        frame.image = item.thumbnail
                    self._views.published(frame, fields, int(fields["latency_ms"]))
            elif reply == 1:
                self._metrics.frames_dead_lettered.labels(self._label, fields["reason"]).inc()
                if self._views is not None:
                    self._views.dead_lettered(frame)
        return len(entries)

    def _entry(self, item: Item, future: asyncio.Future[Outcome] | None
               ) -> tuple[str, str, dict[str, Any], Frame]:
        """The stream, counter, fields and frame of one item's outcome."""
        job = self.job
        extra: dict[str, Any] = {} if job.spec.pipeline else {"job_id": job.id}
        if item.pts_s is not None:
            extra["pts_ms"] = str(round(item.pts_s * 1000))
        outcome: Outcome | None = None
        reason, error = "", ""
        if future is not None:
            try:
                outcome = future.result()
            except InferenceTimeout as e:
                reason, error = "model_timeout", str(e)
            except ShuttingDown as e:
                raise JobStopped(str(e)) from None
        elif item.error is not None:
            reason, error = item.error.reason, str(item.error)
        if isinstance(outcome, Published):
            fields = dict(outcome.fields)
            fields["latency_ms"] = str(max(0, now_ms() - outcome.frame.ts_ms))
            return job.results_stream, "processed", fields | extra, outcome.frame
        if isinstance(outcome, DeadLettered):
            reason, error = outcome.reason, outcome.error
        frame = item.frame or Frame(self._label, self._shown, item.position, {}, now_ms())
        return job.deadletter_stream, "dead_lettered", deadletter_fields(frame, reason, error) | extra, frame

    async def _write_progress(self, last: bool = False) -> None:
        stats = self._video.stats if self._video else None
        counts = dict(self._counts)
        if stats is not None:
            counts = {"decoded": counts["decoded"] + stats.decoded, "sampled": counts["sampled"] + stats.kept}
        duration = stats.duration_s if stats else None
        # a resumed attempt that read no new frame keeps the last one's position (it said null)
        earlier = self.job.progress.get("position_s")
        position = self._position_s if self._position_s is not None else (
            float(earlier) if isinstance(earlier, (int, float)) else None)
        fraction = round(min(1.0, position / duration), 4) if position is not None and duration else None
        if self._read_to_end and duration:
            fraction = 1.0  # the last frame sampled may lie before the end (fps 2: 2.5 s of 3 s)
        progress = {"position_s": position, "duration_s": duration, "fraction": fraction,
                    "last_error": stats.last_error if stats else None,
                    # what the reader jumped over, every attempt's (an HLS segment that could not be
                    # fetched; a live stream reopened at its live edge)
                    "skipped_s": round(float(self.job.progress.get("skipped_s") or 0)
                                       + (stats.skipped_s if stats else 0.0), 3),
                    "last_frame_at": self._last_frame_at or self.job.progress.get("last_frame_at")}
        base = self._base
        timings = {
            "open_s": round(base.get("open_s", 0) + (stats.open_s if stats else 0), 3),
            "decode_s": round(base.get("decode_s", 0) + (stats.decode_s if stats else 0), 3),
            "infer_s": round(base.get("infer_s", 0) + self._waited_s, 3),
            "total_s": round(base.get("total_s", 0) + time.monotonic() - self._started, 3),
        }
        await self._fenced_progress({"counts": json.dumps(counts), "progress": json.dumps(progress),
                                     "timings": json.dumps(timings)}, last)

    async def _last_progress(self) -> None:
        """The counts and position as the run leaves them: the periodic write may be half a
        second old, or not made yet (a job cancelled at once showed 0 frames decoded). Best
        effort, within a second: the lease may be gone, or Redis."""
        with contextlib.suppress(JobStopped, RedisError, OSError, TimeoutError):
            await asyncio.wait_for(self._write_progress(last=True), 1.0)

    async def _fenced_progress(self, fields: dict[str, Any], last: bool = False) -> None:
        fenced(await self._store.progress(self.job.id, self._token, fields, last))


async def _nothing() -> AsyncIterator[Item]:
    return
    yield  # an async generator that gives nothing


async def _put(queue: asyncio.Queue, entry: Any, publishing: asyncio.Task) -> bool:
    """Queue an entry for the publisher; False if the publisher ended first (an error, e.g.
    Redis down): a full queue would otherwise wait for it forever."""
    if not queue.full():
        queue.put_nowait(entry)
        return True
    put = asyncio.ensure_future(queue.put(entry))
    try:
        await asyncio.wait((put, publishing), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        put.cancel()
        raise
    if put.done():
        return True
    put.cancel()  # asyncio.Queue.put gives up cleanly
    return False


def _epoch_s(iso: str | None) -> float | None:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() if iso else None
