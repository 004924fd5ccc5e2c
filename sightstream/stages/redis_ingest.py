"""Redis ingest: one pipeline's consumer-group reader over every stream its input matches.

- Groups are created at ID 0 with MKSTREAM (BUSYGROUP ignored) and re-created on NOGROUP
  (a Redis restarted without persistence has lost them).
- On start it drains its own pending entries (ID 0) before reading new ones (`>`).
- It reads only as many entries as it holds credits for, so backlog waits in Redis.
- New streams matching an input glob are found by a periodic SCAN (every `discover_s`).
"""

from __future__ import annotations

import asyncio
import builtins
import time
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError, ResponseError, TimeoutError

from sightstream import keys, log
from sightstream.config import PipelineSettings
from sightstream.errors import FrameError
from sightstream.frames import DeadLettered, Frame, entry_ms
from sightstream.metrics import Metrics
from sightstream.redis_conn import BLOCK_MS
from sightstream.stages.flow import STOP, Credits, backoff_s, worth_logging

_log = log.get(__name__)
GLOB_CHARS = set("*?[")


class RedisIngest:
    def __init__(
        self,
        pipeline: PipelineSettings,
        client: Redis,
        reader: Redis,
        consumer: str,
        out: asyncio.Queue,
        outcomes: asyncio.Queue,
        credits: Credits,
        metrics: Metrics,
        stop: asyncio.Event,
        exclude_globs: list[str],
        discover_s: float = 2.0,
    ) -> None:
        self._p = pipeline
        self._client = client
        self._reader = reader
        self._consumer = consumer
        self._out = out
        self._outcomes = outcomes
        self._credits = credits
        self._metrics = metrics
        self._stop = stop
        self._exclude = exclude_globs
        self._discover_s = discover_s
        self._group = keys.group(pipeline.name)
        self.streams: list[str] = []  # every stream this pipeline reads
        self._pending: set[str] = set()  # streams whose own pending entries are not yet drained
        self._cursor: dict[str, str] = {}  # next pending ID to read, per draining stream
        self._rotation = 0
        self._next_discovery = 0.0
        self._failures = 0

    async def run(self) -> None:
        while not self._stop.is_set():
            try:
                if time.monotonic() >= self._next_discovery:
                    await self.discover()
                await self._read_once()
                self._failures = 0
            except (ConnectionError, TimeoutError, OSError) as e:
                await self._backoff("redis_unreachable", e)
            except ResponseError as e:
                if "NOGROUP" in str(e):
                    _log.warning("group_missing_recreating", pipeline=self._p.name)
                    self._pending.clear()
                    await self._ensure_groups(self.streams)
                else:
                    await self._backoff("redis_error", e)
        await self._out.put(STOP)

    async def discover(self) -> None:
        """Find the streams matching the inputs and join their groups."""
        found: list[str] = []
        for pattern in self._p.input:
            if GLOB_CHARS & set(pattern):
                async for key in self._client.scan_iter(match=pattern, count=1000, _type="stream"):
                    name = key.decode()
                    if not keys.is_own_output(name, self._exclude):
                        found.append(name)
            else:
                found.append(pattern)
        new = [s for s in dict.fromkeys(found) if s not in self.streams]
        if new:
            await self._ensure_groups(new)
            self.streams.extend(new)
            self._pending.update(new)
            self._metrics.sources.labels(self._p.name).set(len(self.streams))
            _log.info("streams_joined", pipeline=self._p.name, streams=new)
        self._next_discovery = time.monotonic() + self._discover_s

    async def _ensure_groups(self, streams: list[str]) -> None:
        for stream in streams:
            try:
                await self._client.xgroup_create(stream, self._group, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise
            self._pending.add(stream)
            self._cursor[stream] = "0"

    async def _read_once(self) -> None:
        if not self.streams:
            await self._sleep(min(self._discover_s, 0.5))
            return
        room = await self._credits.take(self._p.max_in_flight)
        got = 0
        try:
            got = await self._read(room)
        finally:
            self._credits.give(room - got)

    async def _read(self, room: int) -> int:
        """One XREADGROUP within `room` entries; returns how many frames it queued."""
        if self._pending:
            # Our own pending entries first (left by a previous run under this consumer name).
            stream = next(iter(self._pending))
            reply: Any = await self._client.xreadgroup(
                self._group, self._consumer, {stream: self._cursor.get(stream, "0")}, count=room
            )
            entries = reply[0][1] if reply else []
            if not entries:
                self._pending.discard(stream)
                self._cursor.pop(stream, None)
                return 0
            self._cursor[stream] = entries[-1][0].decode()
            return await self._queue(stream, entries, redelivered=True)
        # XREADGROUP's COUNT is per stream: read at most `room` streams, room // n entries each.
        n = min(room, len(self.streams))
        start = self._rotation % len(self.streams)
        chosen = (self.streams[start:] + self.streams[:start])[:n]
        self._rotation += n
        reply = await self._reader.xreadgroup(
            self._group, self._consumer, {s: ">" for s in chosen}, count=room // n, block=BLOCK_MS
        )  # redis-py types replies loosely: a list of (stream, [(id, fields)]) at run time
        queued = 0
        for stream, entries in reply or ():
            queued += await self._queue(stream.decode(), entries, redelivered=False)
        return queued

    async def _queue(self, stream: str, entries: list, redelivered: bool) -> int:
        loop = asyncio.get_running_loop()
        queued = 0
        for raw_id, fields in entries:
            entry_id = raw_id.decode()
            queued += 1
            self._metrics.frames_in.labels(self._p.name).inc()
            received, release = loop.time(), self._credits.one()
            try:
                frame = Frame.from_entry(
                    self._p.name, stream, entry_id, fields or {},
                    deliveries=2 if redelivered else 1, received=received, release=release,
                )
            except FrameError as e:
                frame = Frame(self._p.name, stream, entry_id, fields or {}, entry_ms(entry_id),
                              received=received, release=release)
                await self._outcomes.put(
                    DeadLettered(frame, keys.deadletter_stream(self._p.name, stream), e.reason, str(e))
                )
                continue
            await self._out.put(frame)
        return queued

    async def _backoff(self, event: str, error: Exception) -> None:
        self._failures += 1
        if worth_logging(self._failures):
            _log.warning(event, pipeline=self._p.name, error=str(error), failures=self._failures)
        self._metrics.redis_errors.labels("read").inc()
        await self._sleep(backoff_s(self._failures))

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except builtins.TimeoutError:
            pass
