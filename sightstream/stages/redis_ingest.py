"""Redis ingest: one pipeline's consumer-group reader over every stream its input matches.

- Groups are created at ID 0 with MKSTREAM (BUSYGROUP ignored) and re-created on NOGROUP
  (a Redis restarted without persistence has lost them).
- On start it drains its own pending entries (ID 0: left by a previous run under this stable
  consumer name) before reading new ones (`>`).
- It reads only as many entries as the pipeline has in-flight room for: backlog stays in Redis.
- New streams matching an input glob are found by a periodic SCAN (every `discover_s`).
"""

from __future__ import annotations

import time
from typing import Any

from redis.asyncio import Redis

from sightstream import keys, log
from sightstream.redis_conn import BLOCK_MS
from sightstream.stages.pending import StreamReader, delivery_counts

_log = log.get(__name__)
GLOB_CHARS = set("*?[")


class RedisIngest(StreamReader):
    def __init__(self, *args: Any, reader: Redis, exclude_globs: list[str], discover_s: float = 2.0,
                 **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._reader = reader  # a client for blocking reads (its socket timeout exceeds BLOCK)
        self._exclude = exclude_globs
        self._discover_s = discover_s
        self.streams: list[str] = []  # every stream this pipeline reads
        self._draining: dict[str, str] = {}  # stream -> next own pending ID still to re-read
        self._rotation = 0
        self._next_discovery = 0.0

    async def step(self) -> None:
        if time.monotonic() >= self._next_discovery:
            await self.discover()
        if not self.streams:
            await self.sleep(min(self._discover_s, 0.5))
            return
        room = await self._in_flight.take(self._p.max_in_flight)
        used = 0
        try:
            used = await (self._drain_own(room) if self._draining else self._read_new(room))
        finally:
            self._in_flight.give(room - used)

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
            await self.ensure_groups(new)
            self.streams.extend(new)
            self._draining.update({s: "0" for s in new})
            self._metrics.sources.labels(self._p.name).set(len(self.streams))
            _log.info("streams_joined", pipeline=self._p.name, streams=new)
        self._next_discovery = time.monotonic() + self._discover_s

    async def on_nogroup(self) -> None:
        await self.ensure_groups(self.streams)
        self._draining.clear()  # a new group has no pending entries

    async def _drain_own(self, room: int) -> int:
        """Re-read this consumer's own pending entries, with their delivery counts."""
        stream, cursor = next(iter(self._draining.items()))
        reply: Any = await self._client.xreadgroup(
            self._group, self._consumer, {stream: cursor}, count=room
        )
        entries = reply[0][1] if reply else []
        if not entries:
            del self._draining[stream]
            return 0
        self._draining[stream] = entries[-1][0].decode()
        counts = await delivery_counts(self._client, stream, self._group, self._consumer,
                                       entries[0][0].decode(), entries[-1][0].decode(), len(entries))
        # The re-read counts as a delivery in Redis (6.2 and 7), so a frame that crashes the
        # daemon at every restart reaches max_deliveries instead of crash-looping forever.
        # A pending entry whose content was deleted comes back with no fields: dead-lettered.
        return await self._admission.admit(stream, entries, counts)

    async def _read_new(self, room: int) -> int:
        # XREADGROUP's COUNT is per stream: read at most `room` streams, room // n entries each.
        n = min(room, len(self.streams))
        start = self._rotation % len(self.streams)
        chosen = (self.streams[start:] + self.streams[:start])[:n]
        self._rotation += n
        # redis-py types replies loosely: at run time, a list of (stream, [(id, fields)]).
        replies: Any = await self._reader.xreadgroup(
            self._group, self._consumer, {s: ">" for s in chosen}, count=room // n, block=BLOCK_MS
        )
        used = 0
        for stream, entries in replies or ():
            used += await self._admission.admit(stream.decode(), entries)
        return used
