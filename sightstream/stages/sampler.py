"""FPS sampler: at most `fps` frames per second of capture time, per source, across every
daemon of the group.

Capture time is cut into buckets of 1/fps seconds; the first frame to claim a bucket (an atomic
SET NX in Redis, shared by all daemons) is kept, the others are acknowledged with no result.
A redelivered winner (same frame_id) is still the winner. Each daemon remembers the buckets it
has seen decided, so only the first frame per bucket costs a round trip, for as long as Redis
keeps the bucket's key: remembered longer, a camera whose clock was stepped back (NTP) lost its
frames on a long-running daemon (its buckets decided an hour before, by this daemon's memory
only), while a daemon started since processed them.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from typing import Any

from redis.asyncio import Redis

from sightstream import keys
from sightstream.frames import Acked, Frame
from sightstream.metrics import Metrics
from sightstream.redis_conn import Lua, run_pipelined
from sightstream.stages.flow import STOP, RedisRetry, Stopped, drain_nowait

# Claim a bucket for a frame; returns the frame that holds it (this one, or an earlier winner)
# and how long, in ms, the bucket's key has left.
CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {ARGV[1], tonumber(ARGV[2])} end
return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}
"""
MIN_TTL_MS = 120_000
MEMORY = 4096  # decided buckets remembered locally


def bucket_of(ts_ms: int, fps: float) -> int:
    return math.floor(ts_ms * fps / 1000)


class Sampler:
    def __init__(
        self, fps: float, client: Redis, inq: asyncio.Queue, out: asyncio.Queue,
        outcomes: asyncio.Queue, metrics: Metrics, stop: asyncio.Event,
    ) -> None:
        self._fps = fps
        self._client = client
        self._in, self._out, self._outcomes = inq, out, outcomes
        self._metrics = metrics
        self._claim = Lua(CLAIM)
        self._retry = RedisRetry("sample", metrics, stop)
        # A bucket's key must outlive any redelivery of its frames.
        self._ttl_ms = max(MIN_TTL_MS, math.ceil(4000 / fps))
        # (source, bucket) -> (the winner's entry ID, monotonic time its key expires in Redis)
        self._decided: OrderedDict[tuple[str, int], tuple[str, float]] = OrderedDict()

    async def run(self) -> None:
        stopped = False
        while not stopped and (first := await self._in.get()) is not STOP:
            frames, stopped = drain_nowait(self._in, first, 256)
            try:
                verdicts = await self.decide(frames)
            except Stopped:  # stopping while Redis is unreachable: left pending, decided later
                for frame in frames:
                    frame.release()
                continue
            kept = 0
            for frame, keep in zip(frames, verdicts):
                if keep:
                    kept += 1
                    await self._out.put(frame)
                else:
                    await self._outcomes.put(Acked(frame, "sampled_out"))
            if kept:  # once per round; a round's frames are of one pipeline
                self._metrics.frames_sampled.labels(frames[0].pipeline).inc(kept)
        await self._out.put(STOP)

    async def decide(self, frames: list[Frame]) -> list[bool]:
        """Keep or skip each frame; one pipelined round trip for the undecided buckets."""
        verdict: list[bool | None] = []
        ask: list[int] = []
        now = time.monotonic()
        for i, f in enumerate(frames):
            winner = self._decided.get((f.source, bucket_of(f.ts_ms, self._fps)))
            if winner is not None and winner[1] <= now:  # its key is gone: decided anew
                winner = None
            verdict.append(None if winner is None else winner[0] == f.entry_id)
            if winner is None:
                ask.append(i)
        if ask:
            replies = await self._claim_all([frames[i] for i in ask])
            now = time.monotonic()
            for i, (winner, ttl_ms) in zip(ask, replies):
                f = frames[i]
                winner_id = winner.decode() if winner else ""  # no key: it expired meanwhile
                verdict[i] = winner_id == f.entry_id
                if winner and ttl_ms > 0:
                    self._remember((f.source, bucket_of(f.ts_ms, self._fps)), winner_id, now + ttl_ms / 1000)
        return [bool(v) for v in verdict]

    async def _claim_all(self, frames: list[Frame]) -> list:
        """One pipelined round of claims, retried while Redis is unreachable (claims are
        idempotent: a frame that already won wins again). Raises Stopped if the daemon stops
        first."""
        def fill(pipe: Any) -> None:
            for f in frames:
                key = keys.sample_key(f.pipeline, f.source, bucket_of(f.ts_ms, self._fps))
                self._claim.queue(pipe, [key], [f.entry_id, self._ttl_ms])

        return await self._retry.call(lambda: run_pipelined(self._client, fill, self._claim))

    def _remember(self, bucket: tuple[str, int], frame_id: str, until: float) -> None:
        self._decided[bucket] = (frame_id, until)
        self._decided.move_to_end(bucket)
        if len(self._decided) > MEMORY:
            self._decided.popitem(last=False)
