"""One job on this daemon, from its start to its end: frames are read from the source (a video
through stages/video_reader.py, or a Redis stream), go through the same ad-hoc batches and
device workers as /predict, and their outcomes are published in read order, each by a script
fenced by the job's lease token, which also moves the checkpoint (sequence number and
position) in the same step.

Resuming after another daemon died: a video is read again after the checkpoint's position
(a VOD seeks there; a live stream goes on from now, skipping what it already reported), a
stream after the checkpoint's entry ID. A result at or below the checkpoint is refused by the
script, so none is reported twice; everything after it is read again, so none is lost.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Any

from redis.asyncio import Redis

from sightstream import log
from sightstream.config import DecodeSettings, JobSettings
from sightstream.errors import FrameError, SightstreamError
from sightstream.frames import DeadLettered, Frame, Outcome, Published, deadletter_fields, entry_ms, now_ms
from sightstream.jobs.sources import Source
from sightstream.jobs.store import Job, JobStore
from sightstream.prompts import Prompt
from sightstream.redis_conn import run_pipelined
from sightstream.stages.adhoc import AdhocBatcher, ShuttingDown
from sightstream.stages.decoder import decode_frame
from sightstream.stages.video_reader import ReaderOptions, VideoSource
from sightstream.stages.worker import InferenceTimeout

_log = log.get(__name__)
PROGRESS_EVERY_S = 0.5


class JobStopped(SightstreamError):
    """The job must stop here: its lease is lost, or it is no longer running (cancelled)."""


@dataclass
class Item:
    """A frame read from the source, with where it was read from (the checkpoint's position)."""

    frame: Frame | None  # None: dead-lettered before inference (`error`)
    position: str
    pts_s: float | None = None
    error: FrameError | None = None


class JobRun:
    def __init__(self, job: Job, source: Source, store: JobStore, token: str, client: Redis,
                 reader: Redis, adhoc: AdhocBatcher, decode_pool: Executor, settings: JobSettings,
                 decode: DecodeSettings, prompt: Callable[[], Prompt] | None = None) -> None:
        self.job = job
        # A user's job keeps its prompt; a pipeline's video input follows the pipeline's.
        self._prompt = prompt or (lambda: Prompt(job.spec.prompt, 1))
        self._label = job.spec.pipeline or "jobs"
        self._source = source
        self._store = store
        self._token = token
        self._client, self._reader = client, reader
        self._adhoc = adhoc
        self._decode_pool = decode_pool
        self._s = settings
        self._decode = decode
        self._video: VideoSource | None = None
        self._seq = job.last_seq
        self._started = time.monotonic()
        self._infer_s = 0.0
        self._base = dict(job.timings)  # earlier attempts' timings
        self._counts = {name: int(job.counts.get(name, 0)) for name in ("decoded", "sampled")}
        self._position_s: float | None = None
        self._next_progress = 0.0

    async def run(self) -> str:
        """Read, infer and publish until the source ends or a limit is reached. Returns the
        final status's reason ("" for a normal end). Raises JobStopped and VideoSourceError."""
        in_flight: deque[tuple[int, Item, asyncio.Future[Outcome] | None, float]] = deque()
        try:
            async for item in self._items():
                if self._limit_reached(item):
                    break
                self._seq += 1
                future = None
                if item.frame is not None:
                    (future,) = await self._adhoc.put(
                        [item.frame], self.job.spec.model, self._prompt(), self._label,
                        (self._s.batch_size, self._s.batch_timeout_ms))
                in_flight.append((self._seq, item, future, time.monotonic()))
                await self._publish_ready(in_flight, until=self._s.max_in_flight - 1)
                await self._maybe_progress()
            await self._publish_ready(in_flight, until=0)
        finally:
            if self._video is not None:
                self._video.stop()
        await self._write_progress()
        return ""

    def _limit_reached(self, item: Item) -> bool:
        spec = self.job.spec
        if spec.max_frames is not None and self._seq >= spec.max_frames:
            return True
        if spec.max_seconds is not None:
            elapsed = item.pts_s if item.pts_s is not None else time.monotonic() - self._started
            return elapsed > spec.max_seconds
        return False

    async def _items(self) -> AsyncIterator[Item]:
        if self._source.is_stream:
            async for item in self._stream_items():
                yield item
            return
        options = ReaderOptions(
            fps=self.job.spec.fps, open_timeout_s=self._s.open_timeout_s,
            read_timeout_s=self._s.read_timeout_s, stall_s=self._s.stall_s,
            max_pixels=self._decode.max_pixels)
        if self.job.spec.pipeline:  # a pipeline's camera that is down is retried until it is back
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
            frame = Frame(self._label, self.job.spec.source, str(vf.index), {}, now_ms(), image=vf.image,
                          orig_size=(w, h))
            yield Item(frame, repr(vf.pts_s), vf.pts_s)

    async def _stream_items(self) -> AsyncIterator[Item]:
        """A Redis stream's entries after the checkpoint (from now, on the first start),
        sampled to `fps` by capture time, decoded in the decode pool."""
        key = self._source.location
        last = self.job.last_position
        if not last:
            info: Any = await self._client.xinfo_stream(key) if await self._client.exists(key) else {}
            raw = info.get("last-generated-id", b"0-0")
            last = raw.decode() if isinstance(raw, bytes) else str(raw)
        bucket = -1
        loop = asyncio.get_running_loop()
        while True:
            reply: Any = await self._reader.xread({key: last}, count=self._s.max_in_flight, block=1000)
            await self._maybe_progress()
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
                    b = int(frame.ts_ms / 1000 * self.job.spec.fps) if self.job.spec.fps > 0 else -2
                    if b == bucket:
                        continue
                    bucket = b if b != -2 else -1
                    try:
                        frame.image, frame.orig_size = await loop.run_in_executor(
                            self._decode_pool, decode_frame, frame.fields, self._decode.max_pixels, None)
                    except FrameError as e:
                        yield Item(None, last, error=e)
                        continue
                    frame.fields = {}
                    self._counts["sampled"] += 1
                    yield Item(frame, last)

    async def _publish_ready(self, in_flight: deque, until: int) -> None:
        """Publish, in read order, every head item whose outcome is in; wait for the head while
        more than `until` items are in flight."""
        while in_flight:
            if len(in_flight) > until:
                head = in_flight[0][2]
                if head is not None:
                    await asyncio.wait([head])
            ready = []
            while in_flight and (in_flight[0][2] is None or in_flight[0][2].done()):
                ready.append(in_flight.popleft())
            if not ready:
                return
            await self._publish(ready)

    async def _publish(self, ready: list[tuple[int, Item, asyncio.Future[Outcome] | None, float]]) -> None:
        job = self.job
        entries = []
        for seq, item, future, submitted in ready:
            entries.append((seq, item.position, *self._entry(item, future)))
            if future is not None:
                self._infer_s += time.monotonic() - submitted

        def fill(pipe: Any) -> None:
            for seq, position, stream, counter, fields in entries:
                maxlen = self._s.result_maxlen if counter == "processed" else 0
                self._store.queue_publish(pipe, job.id, self._token, seq, position, stream, maxlen, counter,
                                          fields)

        replies = await run_pipelined(self._client, fill, self._store.publish_script)
        for reply in replies:
            if reply == -1:
                raise JobStopped("the job's lease was lost: another daemon holds it now")
            if reply == -2:
                raise JobStopped("the job is no longer running (cancelled)")
        job.last_seq, job.last_position = ready[-1][0], ready[-1][1].position

    def _entry(self, item: Item, future: asyncio.Future[Outcome] | None) -> tuple[str, str, dict[str, Any]]:
        """The stream, counter and fields of one item's outcome."""
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
            return job.results_stream, "processed", fields | extra
        if isinstance(outcome, DeadLettered):
            reason, error = outcome.reason, outcome.error
        frame = item.frame or Frame(self._label, job.spec.source, item.position, {}, now_ms())
        return job.deadletter_stream, "dead_lettered", deadletter_fields(frame, reason, error) | extra

    async def _maybe_progress(self) -> None:
        if time.monotonic() >= self._next_progress:
            await self._write_progress()

    async def _write_progress(self) -> None:
        self._next_progress = time.monotonic() + PROGRESS_EVERY_S
        stats = self._video.stats if self._video else None
        counts = dict(self._counts)
        if stats is not None:
            counts = {"decoded": counts["decoded"] + stats.decoded, "sampled": counts["sampled"] + stats.kept}
        duration = stats.duration_s if stats else None
        position = self._position_s
        progress = {"position_s": position, "duration_s": duration,
                    "fraction": round(min(1.0, position / duration), 4) if position is not None and duration
                    else None, "last_error": stats.last_error if stats else None}
        base = self._base
        timings = {
            "open_s": round(base.get("open_s", 0) + (stats.open_s if stats else 0), 3),
            "decode_s": round(base.get("decode_s", 0) + (stats.decode_s if stats else 0), 3),
            "infer_s": round(base.get("infer_s", 0) + self._infer_s, 3),
            "total_s": round(base.get("total_s", 0) + time.monotonic() - self._started, 3),
        }
        await self._fenced_progress({"counts": json.dumps(counts), "progress": json.dumps(progress),
                                     "timings": json.dumps(timings)})

    async def _fenced_progress(self, fields: dict[str, Any]) -> None:
        reply = await self._store.progress(self.job.id, self._token, fields)
        if reply == -1:
            raise JobStopped("the job's lease was lost: another daemon holds it now")
        if reply == -2:
            raise JobStopped("the job is no longer running (cancelled)")
