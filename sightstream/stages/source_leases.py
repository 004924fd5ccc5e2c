"""Source leases: for pipelines whose model keeps state per source (tracking), each source
stream is read by one daemon at a time, so all its frames meet the same state, in order.

A daemon holds a lease per stream in Redis (`SET NX PX`, renewed while it lives). Streams are
shared fairly: a daemon takes free streams up to ceil(streams / daemons serving the pipeline),
and gives back one surplus stream per round (one with no frame in flight) when more daemons
join. When a daemon dies its leases expire and the others take its streams over, with the
frames it left pending (claimed at once: the lease proves their reader gone).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from sightstream import keys, log
from sightstream.leases import RELEASE, RENEW
from sightstream.metrics import Metrics
from sightstream.stages.flow import RedisRetry, wait_or_stop

_log = log.get(__name__)


class SourceLeases:
    def __init__(self, client: Redis, pipeline: str, consumer: str, ttl_ms: int = 10_000,
                 on_lost: Callable[[], None] = lambda: None) -> None:
        self._client = client
        self._on_lost = on_lost
        self._pipeline = pipeline
        self._consumer = consumer  # the token: a restarted daemon (same name) keeps its streams
        self.ttl_ms = ttl_ms
        self.held: list[str] = []
        self.lost: list[str] = []  # taken by another daemon while ours: the reader drops them

    async def settle(self, found: list[str], busy: Callable[[str], bool]) -> list[str]:
        """One round: take free streams up to a fair share, give one surplus stream back.
        `busy(stream)`: frames of it are in flight here (it is not given back then).
        Returns the streams newly taken."""
        await self._client.set(keys.source_member(self._pipeline, self._consumer), 1, px=self.ttl_ms)
        members = 0
        async for _ in self._client.scan_iter(match=keys.source_member(self._pipeline, "*"), count=1000):
            members += 1
        share = math.ceil(len(found) / max(1, members))
        taken = []
        for stream in found:
            if len(self.held) >= share:
                break
            if stream in self.held:
                continue
            if await self._client.eval(RENEW, 1, self._key(stream), self._consumer, self.ttl_ms):
                self.held.append(stream)
                taken.append(stream)
        if len(self.held) > share:
            spare = [s for s in self.held if not busy(s)]
            if spare:
                await self.give_back(spare[-1])
        return taken

    async def give_back(self, stream: str) -> None:
        self.held.remove(stream)
        await self._client.eval(RELEASE, 1, self._key(stream), self._consumer)
        _log.info("source_released", pipeline=self._pipeline, source=stream)

    async def keep(self, stop: asyncio.Event, metrics: Metrics) -> None:
        """Renew the held leases until stopped (in its own task: a slow model call must not let
        them lapse). A lease found taken goes to `lost`. The daemon releases them once drained.
        Redis errors are counted and logged (`source_lease`); the next round retries, and a
        lease that lapsed meanwhile is found then."""
        retry = RedisRetry("source_lease", metrics, stop, pipeline=self._pipeline)
        while not stop.is_set():
            if await wait_or_stop(stop, self.ttl_ms / 3000):
                return
            try:
                for stream in list(self.held):
                    if not await self._client.eval(RENEW, 1, self._key(stream), self._consumer, self.ttl_ms):
                        self.held.remove(stream)
                        self.lost.append(stream)
                        self._on_lost()
                        _log.warning("source_lease_lost", pipeline=self._pipeline, source=stream)
                retry.succeeded()
            except (RedisError, OSError) as e:
                retry.note(e)

    async def release_all(self) -> None:
        try:
            for stream in list(self.held):
                await self.give_back(stream)
            await self._client.delete(keys.source_member(self._pipeline, self._consumer))
        except (RedisError, OSError):
            pass  # they expire

    def _key(self, stream: str) -> str:
        return keys.source_lease(self._pipeline, stream)
