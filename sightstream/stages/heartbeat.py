"""Heartbeat: keeps a slow but live daemon's work from being reclaimed by another.

Every third of `reclaim_min_idle_ms`, the frames this daemon holds in flight are re-claimed by
itself (XCLAIM … JUSTID, which resets their idle time without counting a delivery). Only
entries idle for at least that third are touched, so an entry another daemon has just taken
over is never taken back.

An entry trimmed or deleted while in flight is not re-claimed: XCLAIM would drop it from the
pending list without a word, and its result with it (the publisher writes only for entries
still pending). Left pending, it is either published and acknowledged as usual, or reported
by the next XAUTOCLAIM, once, to one daemon, which writes its one outcome (see Frame.pending)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from sightstream import keys
from sightstream.metrics import Metrics
from sightstream.redis_conn import Lua, run_pipelined
from sightstream.stages.flow import InFlight, RedisRetry, wait_or_stop

# KEYS: the stream. ARGV: group, consumer, min idle ms, then the entry IDs. XCLAIMs (JUSTID)
# those whose entries still exist, in chunks (Lua's unpack has a stack limit).
RECLAIM_EXISTING = """
local ids = {}
for i = 4, #ARGV do
  if #redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i]) > 0 then ids[#ids + 1] = ARGV[i] end
end
for first = 1, #ids, 1000 do
  local args = {KEYS[1], ARGV[1], ARGV[2], ARGV[3]}
  for i = first, math.min(first + 999, #ids) do args[#args + 1] = ids[i] end
  args[#args + 1] = 'JUSTID'
  redis.call('XCLAIM', unpack(args))
end
return #ids
"""


class Heartbeat:
    def __init__(
        self, client: Redis, consumer: Callable[[], str], in_flight: dict[str, InFlight], metrics: Metrics,
        stop: asyncio.Event, min_idle_ms: int,
    ) -> None:
        self._client = client
        self._consumer = consumer
        self._in_flight = in_flight
        self._metrics = metrics
        self._stop = stop
        self._every_ms = max(1, min_idle_ms // 3)
        self._retry = RedisRetry("heartbeat", metrics, stop)
        self._script = Lua(RECLAIM_EXISTING)

    async def run(self) -> None:
        while not self._stop.is_set():
            if await wait_or_stop(self._stop, self._every_ms / 1000):
                return
            try:
                await self.beat()
                self._retry.succeeded()
            except (RedisError, OSError) as e:  # the next beat retries, on its own cadence
                self._retry.note(e)

    async def beat(self) -> None:
        calls: list[tuple[str, str, list[str]]] = []
        for pipeline, in_flight in self._in_flight.items():
            by_stream: dict[str, list[str]] = defaultdict(list)
            for frame in in_flight.frames():
                if frame.pending:
                    by_stream[frame.stream].append(frame.entry_id)
            for stream, ids in by_stream.items():
                calls.append((pipeline, stream, ids))
                self._metrics.heartbeats.labels(pipeline).inc(len(ids))
        if not calls:
            return

        def fill(pipe: Any) -> None:
            for pipeline, stream, ids in calls:
                # Under the current name: after a lost consumer lease, this moves our frames in
                # flight to the new name too.
                args = [keys.group(pipeline), self._consumer(), self._every_ms, *ids]
                self._script.queue(pipe, [stream], args)

        await run_pipelined(self._client, fill, self._script)
