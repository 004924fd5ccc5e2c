"""The consumer groups' backlog per source: entries pending (read, not acknowledged) and lag
(not yet read), from XINFO GROUPS. Read on request by GET /pipelines/{name}, and every few
seconds into the `sightstream_source_pending` / `sightstream_source_lag` gauges that alert
rules watch (with `sightstream_jobs_active`, the jobs pending or running). Group-wide figures:
every daemon of the group reports the same values (take the max across daemons, not the sum)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from sightstream import keys, log
from sightstream.metrics import Metrics
from sightstream.stages.flow import wait_or_stop

_log = log.get(__name__)


@dataclass(frozen=True, slots=True)
class Backlog:
    stream: str
    pending: int
    lag: int | None  # None on Redis 6.2 (no lag in XINFO)
    last_delivered_id: str


async def group_backlog(client: Redis, pipeline: str, streams: list[str]) -> list[Backlog]:
    """Each stream's entry for the pipeline's group, in one pipelined round (RedisError when
    Redis is unreachable; streams that are gone are left out)."""
    if not streams:
        return []
    group = keys.group(pipeline).encode()
    async with client.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xinfo_groups(stream)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
    out = []
    for stream, groups in zip(streams, replies):
        if isinstance(groups, ResponseError):  # the stream is gone
            continue
        for g in groups:
            if g["name"] == group:
                lag = g.get("lag")
                out.append(Backlog(stream, int(g["pending"]), None if lag is None else int(lag),
                                   g["last-delivered-id"].decode()))
    return out


async def keep_gauges(client: Redis, streams: dict[str, Any], metrics: Metrics, stop: asyncio.Event,
                      every_s: float = 5.0) -> None:
    """Refresh the backlog gauges of every stream each pipeline reads (`streams`: pipeline ->
    a callable giving its streams), dropping the gauges of streams no longer read."""
    shown: set[tuple[str, str]] = set()
    while not await wait_or_stop(stop, every_s):
        try:
            metrics.jobs_active.set(await client.scard(keys.JOBS_ACTIVE))
        except (RedisError, OSError):
            pass  # the readers report Redis errors
        now: set[tuple[str, str]] = set()
        for pipeline, read in streams.items():
            try:
                backlog = await group_backlog(client, pipeline, list(read()))
            except (RedisError, OSError) as e:  # the readers report Redis errors; skip a round
                _log.debug("backlog_unavailable", pipeline=pipeline, error=str(e))
                now |= {k for k in shown if k[0] == pipeline}
                continue
            for b in backlog:
                now.add((pipeline, b.stream))
                metrics.source_pending.labels(pipeline, b.stream).set(b.pending)
                if b.lag is not None:
                    metrics.source_lag.labels(pipeline, b.stream).set(b.lag)
                else:  # Redis 6.2, or a lag Redis cannot tell (entries deleted): no stale value
                    _remove(metrics.source_lag, pipeline, b.stream)
        for pipeline, stream in shown - now:
            _remove(metrics.source_pending, pipeline, stream)
            _remove(metrics.source_lag, pipeline, stream)
        shown = now


def _remove(gauge: Any, *labels: str) -> None:
    try:
        gauge.remove(*labels)
    except KeyError:
        pass
