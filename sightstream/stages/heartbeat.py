"""Heartbeat: keeps a slow but live daemon's work from being reclaimed by another.

Every third of `reclaim_min_idle_ms`, the frames this daemon holds in flight are re-claimed by
itself (XCLAIM … JUSTID, which resets their idle time without counting a delivery). Only
entries idle for at least that third are touched, so an entry another daemon has just taken
over is never taken back."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from sightstream import keys
from sightstream.metrics import Metrics
from sightstream.stages.flow import InFlight, RedisRetry, wait_or_stop


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
        async with self._client.pipeline(transaction=False) as pipe:
            queued = False
            for pipeline, in_flight in self._in_flight.items():
                by_stream: dict[str, list[Any]] = defaultdict(list)  # Any: redis-py's ID types
                for frame in in_flight.frames():
                    by_stream[frame.stream].append(frame.entry_id)
                for stream, ids in by_stream.items():
                    # Under the current name: after a lost consumer lease, this moves our frames
                    # in flight to the new name too.
                    pipe.xclaim(stream, keys.group(pipeline), self._consumer(), self._every_ms, ids,
                                justid=True)
                    self._metrics.heartbeats.labels(pipeline).inc(len(ids))
                    queued = True
            if queued:
                await pipe.execute()
