"""Admission: raw stream entries become frames for the pipeline, or dead-letter outcomes.

Shared by the two readers: the ingest (new entries, and its own pending ones after a restart)
and the reclaimer (entries taken over from other consumers). Delivery counts come from
XPENDING; a frame delivered more than `max_deliveries` times is dead-lettered
(`max_deliveries`) instead of being tried again.

A chained pipeline (`prompt_from`) reads an upstream pipeline's result entries: each names a
frame (`source`, `frame_id`), fetched here from its stream by ID, and carries the detections
that prompt this pipeline's model. A frame already trimmed away is dead-lettered (`source_gone`).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from sightstream import keys, log
from sightstream.config import PipelineSettings
from sightstream.errors import FrameError
from sightstream.frames import Acked, DeadLettered, Frame, arrival_ms, entry_ms, is_stale, now_ms
from sightstream.metrics import Metrics
from sightstream.stages.clock_skew import ClockSkews
from sightstream.stages.flow import InFlight, RedisRetry, Stopped, wait_or_stop
from sightstream.stages.queue_wait import QueueWait

_log = log.get(__name__)


async def pending_entries(
    client: Redis, stream: str, group: str, consumer: str, lo: str, hi: str, count: int
) -> dict[str, tuple[int, int]]:
    """(times delivered, ms since the last delivery) per entry ID, of this consumer's pending
    entries in [lo, hi]."""
    rows: Any = await client.xpending_range(stream, group, lo, hi, count, consumername=consumer)
    return {r["message_id"].decode(): (int(r["times_delivered"]), int(r["time_since_delivered"]))
            for r in rows}


async def delivery_counts(
    client: Redis, stream: str, group: str, consumer: str, lo: str, hi: str, count: int
) -> dict[str, int]:
    """Times delivered, per entry ID, of this consumer's pending entries in [lo, hi]."""
    rows = await pending_entries(client, stream, group, consumer, lo, hi, count)
    return {entry_id: times for entry_id, (times, _) in rows.items()}


class Admission:
    def __init__(
        self, pipeline: PipelineSettings, in_flight: InFlight, out: asyncio.Queue,
        outcomes: asyncio.Queue, metrics: Metrics, client: Redis, stop: asyncio.Event,
        on_read: Callable[[str, str, int], None] | None = None, waits: QueueWait | None = None,
        skews: ClockSkews | None = None,
    ) -> None:
        self._p = pipeline
        self._skews = skews
        self._waits = waits  # live mode: a frame that would be stale by the time it reaches the device
        self._on_read = on_read  # (pipeline, stream, frames): the live page's per-source rates
        self._in_flight = in_flight
        self._out, self._outcomes = out, outcomes
        self._metrics = metrics
        self._client = client  # chained pipelines fetch their frames with it
        self._fetch_retry = RedisRetry("fetch_source", metrics, stop, pipeline=pipeline.name)
        # stream -> how many times this daemon has taken it (source leases): tracking state
        # built before a stream went to another daemon and came back is not reused
        self.generations: dict[str, int] = {}
        self._frames_in = metrics.frames_in.labels(pipeline.name)  # looked up once, used per frame

    async def admit(
        self, stream: str, entries: list, deliveries: dict[str, int] | None = None
    ) -> int:
        """Queue each entry as a frame (or an outcome). Uses one reserved in-flight place per
        entry it keeps; returns how many places it used."""
        return (await self.admit_read(stream, entries, deliveries))[0]

    async def admit_read(
        self, stream: str, entries: list, deliveries: dict[str, int] | None = None
    ) -> tuple[int, int, int]:
        """As admit; returns (places used, of them frames dropped in live mode, of those the
        ones dropped for their age rather than past the stream's share of the queue)."""
        stale = 0
        read: list[Frame] = []
        kept: list[Frame] = []
        clocked: Frame | None = None  # the last frame parsed
        read_at = now_ms()
        # Live mode under overload: a tighter age, and a share of the queue (stages/queue_wait.py)
        max_age_ms, room = self._p.max_age_ms, None
        if max_age_ms and self._waits is not None:
            max_age_ms, room = self._waits.limits(self._in_flight.waiting(), stream)
        for raw_id, fields in entries:
            entry_id = raw_id.decode()
            times = (deliveries or {}).get(entry_id, 1)
            arrived = arrival_ms(entry_id)  # an ID ahead of now (a producer's own) counts from now
            frame = Frame(self._p.name, stream, entry_id, fields or {}, entry_ms(entry_id), deliveries=times,
                          generation=self.generations.get(stream, 0),
                          arrived_ms=None if arrived is None else min(arrived, read_at))
            if not self._in_flight.hold(frame):
                continue  # already being processed here
            read.append(frame)
            self._frames_in.inc()
            if times > self._p.max_deliveries:
                await self.dead_letter(frame, "max_deliveries",
                                       f"delivered {times} times; max_deliveries is {self._p.max_deliveries}")
                continue
            parse = frame.parse_upstream_result if self._p.prompt_from else frame.parse_fields
            if not await self._checked(frame, parse):
                continue
            clocked = frame
            if is_stale(frame, max_age_ms):  # dropped as read: it takes no turn downstream
                stale += 1
                await self._outcomes.put(Acked(frame, "stale"))
                continue
            kept.append(frame)
        aged = stale
        # the producer's clock, by the last frame of the read (one stream's): once per read
        if self._skews is not None and clocked is not None and clocked.arrived_ms is not None \
                and not self._p.prompt_from:
            self._skews.note(self._p.name, stream, clocked.ts_ms - clocked.arrived_ms)
        if room is not None and len(kept) > max(0, room):  # past its share: skip to its newest
            skipped, kept = (kept[:-room], kept[-room:]) if room > 0 else (kept, [])
            stale += len(skipped)
            for frame in skipped:
                await self._outcomes.put(Acked(frame, "stale"))
        used = len(read)
        if used and self._on_read is not None:
            # by source: a chained pipeline's frames (once parsed) name the upstream's source
            for source, n in Counter(f.source for f in read).items():
                self._on_read(self._p.name, source, n)
        if self._p.prompt_from and kept:
            try:
                kept = await self._with_source_frames(kept)
            except Stopped:  # stopping while Redis is unreachable: left pending
                for frame in kept:
                    frame.release()
                return used, stale, aged
        for frame in kept:
            await self._out.put(frame)
        return used, stale, aged

    async def _with_source_frames(self, frames: list[Frame]) -> list[Frame]:
        """Fetch the frames that chained entries describe (one pipelined round, retried while
        Redis is unreachable; raises Stopped if the daemon stops first); those gone, unreadable
        or malformed are dead-lettered."""
        client = self._client

        async def fetch() -> list:
            async with client.pipeline(transaction=False) as pipe:
                for f in frames:
                    pipe.xrange(f.source, f.frame_id, f.frame_id, count=1)
                return await pipe.execute(raise_on_error=False)

        replies = await self._fetch_retry.call(fetch)
        kept = []
        for frame, reply in zip(frames, replies):
            if isinstance(reply, RedisError):  # e.g. the source key is not a stream
                await self.dead_letter(frame, "source_gone",
                                       f"frame {frame.frame_id} could not be read from "
                                       f"{frame.source}: {reply}")
                continue
            if not reply:
                await self.dead_letter(frame, "source_gone",
                                       f"frame {frame.frame_id} is no longer in {frame.source} "
                                       "(trimmed or deleted before this chained pipeline read it)")
                continue
            frame.fields = reply[0][1]
            if await self._checked(frame, frame.parse_fields):
                kept.append(frame)
        return kept

    async def _checked(self, frame: Frame, parse: Callable[[], None]) -> bool:
        """Check a frame's fields with `parse`; one that fails is dead-lettered with its reason."""
        try:
            parse()
        except FrameError as e:
            await self.dead_letter(frame, e.reason, str(e))
            return False
        return True

    async def admit_missing(self, stream: str, entry_ids: list[str], deliveries: dict[str, int]) -> int:
        """Entries pending with us whose content is gone (trimmed or deleted): dead-letter them."""
        used = 0
        for entry_id in entry_ids:
            frame = Frame(self._p.name, stream, entry_id, {}, entry_ms(entry_id),
                          deliveries=deliveries.get(entry_id, 1))
            if self._in_flight.hold(frame):
                used += 1
                await self.dead_letter(frame, "empty_entry",
                                       "the entry was trimmed or deleted before it was processed")
        return used

    async def dead_letter(self, frame: Frame, reason: str, error: str) -> None:
        await self._outcomes.put(DeadLettered.of(frame, reason, error))

    async def dead_letter_gone(self, stream: str, entry_id: str) -> None:
        """A deleted entry Redis has already dropped from the pending list (Redis 7's
        XAUTOCLAIM reports its ID once, to one claimer). Held here (trimmed while being
        processed), its outcome is written when ready; else its dead-letter entry now.
        Either is written once, with nothing to acknowledge."""
        if (held := self._in_flight.held(stream, entry_id)) is not None:
            held.pending = False
            return
        frame = Frame(self._p.name, stream, entry_id, {}, entry_ms(entry_id), pending=False)
        await self._outcomes.put(DeadLettered.of(
            frame, "empty_entry", "the entry was trimmed or deleted before it was processed"))


class StreamReader:
    """What the two readers of a pipeline's group share: settings, clients, admission, and
    surviving Redis outages (RedisRetry: back-off, counted and logged by `op`; groups re-created
    on NOGROUP)."""

    op = "read"  # its label in redis_errors_total / redis_reconnects_total

    def __init__(
        self, pipeline: PipelineSettings, client: Redis, consumer: Callable[[], str], admission: Admission,
        in_flight: InFlight, metrics: Metrics, stop: asyncio.Event,
    ) -> None:
        self._p = pipeline
        self._client = client
        self._consumer_name = consumer  # may change: a lost consumer lease is replaced
        self._admission = admission
        self._in_flight = in_flight
        self._metrics = metrics
        self._stop = stop
        self._group = keys.group(pipeline.name)
        self._retry = RedisRetry(self.op, metrics, stop, pipeline=pipeline.name)
        self._history_from: str | None = None  # see _group_start

    @property
    def _consumer(self) -> str:
        return self._consumer_name()

    async def run(self) -> None:
        """Until stopped: one step at a time, surviving Redis errors. Sources do not forward
        STOP: the daemon does, once every reader of the pipeline has ended."""
        nogroup = False
        while not self._stop.is_set():
            try:
                if nogroup:
                    await self.on_nogroup()
                    nogroup = False
                await self.step()
                if not self._stop.is_set():  # a step that ended for the stop proves nothing of Redis
                    self._retry.succeeded()
            except ResponseError as e:
                # NOGROUP; or UNBLOCKED: the stream a blocking read waited on was deleted
                if "NOGROUP" not in str(e) and "UNBLOCKED" not in str(e):
                    await self._backoff(e)
                    continue
                nogroup = True  # a stream deleted, or Redis lost its data: on_nogroup (next turn) says which
            except (RedisError, OSError) as e:
                await self._backoff(e)

    async def step(self) -> None:
        raise NotImplementedError

    async def on_nogroup(self) -> None:
        """The group vanished (Redis restarted without persistence). The ingest re-creates it;
        the reclaimer has nothing to do (a new group has nothing to reclaim)."""

    async def ensure_groups(self, streams: list[str], make: set[str]) -> tuple[list[str], list[str]]:
        """Create each stream's group where missing, and the stream itself only if in `make`
        (named in the config): a stream found by a glob and deleted since is not made again.
        Returns (the groups created, the streams that no longer exist)."""
        created: list[str] = []
        gone: list[str] = []
        start = await self._group_start() if streams else "0"
        for stream in streams:
            try:
                await self._client.xgroup_create(stream, self._group, id=start, mkstream=stream in make)
                created.append(stream)
            except ResponseError as e:
                if "requires the key to exist" in str(e):
                    gone.append(stream)
                elif "BUSYGROUP" not in str(e):
                    raise
        return created, gone

    async def _group_start(self) -> str:
        """Where a group made here starts: the stream's oldest entry, or with the pipeline's
        `skip_history` the moment this reader first looked for its streams (the ingest asks at
        its first discovery), by Redis's clock: entry IDs are its milliseconds, and the group
        starts after the last ID of the millisecond before, so a camera found later still gives
        every frame since."""
        if not self._p.skip_history:
            return "0"
        if self._history_from is None:
            seconds, micros = await self._client.time()
            self._history_from = f"{seconds * 1000 + micros // 1000 - 1}-18446744073709551615"
        return self._history_from

    async def _backoff(self, error: Exception) -> None:
        try:
            await self._retry.failed(error)
        except Stopped:
            pass  # run() sees the stop

    async def sleep(self, seconds: float) -> None:
        """Sleep, but wake at once when the daemon stops."""
        await wait_or_stop(self._stop, seconds)
