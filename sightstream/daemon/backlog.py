"""The consumer groups' backlog per source: entries pending (read, not acknowledged) and lag
(not yet read), from XINFO GROUPS. Read on request by GET /pipelines/{name}, and every few
seconds into the `sightstream_source_pending` / `sightstream_source_lag` gauges that alert
rules watch (with `sightstream_jobs_active`, the jobs pending or running). Group-wide figures:
every daemon of the group reports the same values (take the max across daemons, not the sum).

Redis 7.0 can keep reporting a lag after a producer's MAXLEN trimmed the stream (its count of
entries read no longer matches), even once the group has read everything. A lag above 0 is
therefore checked against the stream itself: 0 when no entry comes after the group's last
delivered one, and never more than the stream holds."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from sightstream import keys, log
from sightstream.metrics import Metrics
from sightstream.redis_conn import Lua, run_pipelined
from sightstream.stages.flow import wait_or_stop

_log = log.get(__name__)


# KEYS: the stream. ARGV: the group's last delivered ID. {1 if an entry comes after it else 0,
# XLEN}: only the answer crosses the network, not the entry (a frame can be megabytes).
UNREAD = """
local after = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', 1)
return {#after, redis.call('XLEN', KEYS[1])}
"""
_UNREAD = Lua(UNREAD)


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
    return await _checked_lags(client, out)


async def unowned_groups(client: Redis, streams: list[str], owned: set[str]) -> dict[str, dict[str, int]]:
    """Groups on `streams` not in `owned` (a removed or renamed pipeline's, or another config's
    on the same Redis), each with how many streams it is on and its pending and lag summed
    there (lag unchecked). RedisError when Redis is unreachable."""
    if not streams:
        return {}
    async with client.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xinfo_groups(stream)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
    found: dict[str, dict[str, int]] = {}
    for groups in replies:
        if isinstance(groups, ResponseError):  # the stream is gone
            continue
        for g in groups:
            if (name := g["name"].decode(errors="replace")) not in owned:
                seen = found.setdefault(name, {"streams": 0, "pending": 0, "lag": 0})
                seen["streams"] += 1
                seen["pending"] += int(g["pending"])
                seen["lag"] += int(g.get("lag") or 0)
    return found


async def _checked_lags(client: Redis, backlog: list[Backlog]) -> list[Backlog]:
    """Each lag above 0 checked against the stream (see the module's note)."""
    lagging = [k for k, b in enumerate(backlog) if b.lag]
    if not lagging:
        return backlog

    def fill(pipe: Any) -> None:
        for k in lagging:
            _UNREAD.queue(pipe, [backlog[k].stream], [backlog[k].last_delivered_id])

    replies = await run_pipelined(client, fill, _UNREAD, raise_on_error=False)
    out = list(backlog)
    for k, reply in zip(lagging, replies):
        if isinstance(reply, ResponseError):  # the stream became another type meanwhile: as Redis said
            continue
        unread, length = int(reply[0]), int(reply[1])
        b = backlog[k]
        out[k] = Backlog(b.stream, b.pending, min(b.lag or 0, length) if unread else 0, b.last_delivered_id)
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
