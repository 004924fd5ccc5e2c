"""Pipelines: what each one is doing. Group-wide figures come from Redis (pending entries and
lag per source, XINFO GROUPS: every daemon's share); rates, counts and latency are this
daemon's own (its counters since start; rates over the last 10 s; latency of its last 1,000
results). With several daemons, sum their rates and counts (or scrape /metrics)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, Field
from redis.exceptions import RedisError

from sightstream import keys
from sightstream.config import PipelineSettings
from sightstream.control.api import Api, ApiError, Resp
from sightstream.control.openapi import error
from sightstream.control.state import DAEMON, reply
from sightstream.daemon.backlog import group_backlog
from sightstream.daemon.daemon import Daemon, PipelineRun
from sightstream.jobs.runner import input_spec
from sightstream.jobs.store import Job

# How long the figures wait on Redis: past it they are answered with what this daemon knows
# and `redis_error`, as when Redis is down (a hung cluster node held the answer for minutes).
ASK_LIMIT_S = 3.0
T = TypeVar("T")

api = Api("pipelines")


class Source(BaseModel):
    stream: str
    source: str = Field(description="the source its frames are of: the stream itself, or for a chained "
                                    "pipeline the source whose upstream results it reads")
    pending: int = Field(description="read by a daemon of the group, not yet acknowledged")
    lag: int | None = Field(description="entries not yet read by the group (null on Redis 6.2)")
    last_delivered_id: str
    reader: str | None = Field(None, description="a pipeline whose model keeps state per source (tracking) "
                               "has one daemon per source: its consumer name, or null while none holds it "
                               "(another takes it within the lease, 10 s); null for other pipelines, "
                               "whose sources every daemon of the group reads")
    dead_lettered: int = Field(0, description="this daemon's frames of the source sent to the dead-letter "
                               "stream since it started (a camera sending only bad frames has no other "
                               "figure)")
    clock_skew_ms: int | None = Field(None, description=(
        "the latest frame this daemon read of the stream: its ts minus when it reached Redis (its entry "
        "ID), in ms; far from 0 (past 2 s, said in a source_clock_skew log line), the producer's clock is "
        "off or its ts is not ms since the epoch. Null: no frame read here yet, or a chained pipeline"))


class Counts(BaseModel):
    read: int
    published: int
    sampled_out: int = Field(description="skipped by the FPS sampler")
    stale: int = Field(description="dropped in live mode (older than max_age_ms)")
    dead_lettered: dict[str, int] = Field(description="by reason")
    reclaimed: int


class Latency(BaseModel):
    p50_ms: float | None
    p99_ms: float | None
    results: int = Field(description="how many recent results these percentiles cover")


class VideoInput(BaseModel):
    url: str
    job_id: str = Field(description="GET /jobs/{id} tells more")
    results_stream: str = Field(description="where its results go (on Redis Cluster, named with the job's "
                                            "hash tag)")
    deadletter_stream: str
    status: str = Field(description="pending | running | completed (a VOD read to its end) | unknown "
                                    "(Redis cannot be asked)")
    holder: str = Field(description="the daemon reading it")
    attempt: int
    processed: int
    last_error: str | None = Field(None, description="why the source was last reopened (it may be read "
                                   "again since: see last_frame_at), or why it failed")
    last_frame_at: str | None = Field(None, description="when the source last gave a frame (ISO 8601 UTC)")


class Pipeline(BaseModel):
    name: str
    model: str
    task: str
    input: list[str]
    output: str
    fps: float = Field(description="the target: at most this many results per second per source (0: all)")
    prompt_version: int
    fps_in: float = Field(description="frames read per second, this daemon, last 10 s")
    fps_out: float = Field(description="results published per second, this daemon, last 10 s")
    in_flight: int
    paused: str | None = Field(None, description="why the pipeline reads nothing now: its model is loading "
                               "(at start), or cannot be loaded (tried again every 30 s at most); its "
                               "frames wait in Redis")
    counts: Counts = Field(description="this daemon, since it started")
    latency: Latency = Field(description="capture to publication, this daemon's recent results")
    pending: int | None = Field(description="group-wide, all sources (null while Redis cannot be asked)")
    lag: int | None = Field(description="group-wide, all sources (null on Redis 6.2, or while Redis "
                                        "cannot be asked)")
    sources: list[Source] | None = None
    redis_error: str | None = Field(None, description="why the group-wide figures are null: Redis cannot be "
                                                      "asked now (this daemon's own figures still are)")
    videos: list[VideoInput] = Field(default_factory=list, description="the input's video URLs")


class Pipelines(BaseModel):
    pipelines: list[Pipeline]


@api.get("/pipelines", "Every pipeline: rates, counts, lag, pending, latency (Redis down: its figures null)",
         responses={200: Resp("The pipelines", Pipelines)})
async def list_pipelines(request: web.Request) -> web.Response:
    d = request.app[DAEMON]
    # at once: with Redis slow, each pipeline's wait would add up
    described = await asyncio.gather(*(_describe(d, p, sources=False) for p in d.settings.pipelines))
    return reply(Pipelines(pipelines=list(described)))


@api.get("/pipelines/{name}", "One pipeline, with each source's pending entries and lag",
         responses={200: Resp("The pipeline", Pipeline), 404: error("No pipeline of that name")})
async def get_pipeline(request: web.Request) -> web.Response:
    d = request.app[DAEMON]
    name = request.match_info["name"]
    for p in d.settings.pipelines:
        if p.name == name:
            return reply(await _describe(d, p, sources=True))
    raise ApiError(404, f"no pipeline named {name!r}")


async def _describe(d: Daemon, p: PipelineSettings, *, sources: bool) -> Pipeline:
    run = d.runs.get(p.name)
    found, redis_error = await _sources(d, p, run, readers=sources)
    if run is None and redis_error is None:
        redis_error = "not read yet: the daemon is waiting for Redis"
    fps_in, fps_out = d.rates.fps(p.name)
    count = d.rates.count
    dead = {}
    for metric in d.metrics.frames_dead_lettered.collect():
        for s in metric.samples:
            if s.name.endswith("_total") and s.labels["pipeline"] == p.name and s.value:  # reasons seen
                dead[s.labels["reason"]] = int(s.value)
    recent = sorted(d.publisher.recent_latency_ms.get(p.name, ())) if d.publisher else []
    lags = [s.lag for s in found or ()]
    known = found is not None and run is not None
    lag = None if not known or None in lags else sum(lag for lag in lags if lag is not None)
    return Pipeline(
        name=p.name, model=p.model, task=d.catalogue.get(p.model).task, input=p.shown_input, output=p.output,
        fps=p.fps, prompt_version=d.prompt_book.current(p.name).version, fps_in=fps_in, fps_out=fps_out,
        in_flight=run.in_flight.in_flight if run else 0,
        paused=run.in_flight.paused if run else None,
        counts=Counts(
            read=int(count("sightstream_frames_in_total", p.name)),
            published=int(count("sightstream_frames_published_total", p.name)),
            sampled_out=int(_acked(d, p.name, "sampled_out")), stale=int(_acked(d, p.name, "stale")),
            dead_lettered=dead, reclaimed=run.reclaimer.reclaimed if run else 0,
        ),
        latency=Latency(p50_ms=_quantile(recent, 0.5), p99_ms=_quantile(recent, 0.99), results=len(recent)),
        pending=sum(s.pending for s in found or ()) if known else None,
        lag=lag,
        sources=found if sources else None,
        videos=await _videos(d, p, asked=redis_error is None),
        redis_error=redis_error,
    )


async def _videos(d: Daemon, p: PipelineSettings, asked: bool = True) -> list[VideoInput]:
    """Each video input with its job; `asked` False: Redis failed already, do not wait on it
    once per input (each try takes a connect timeout), say unknown."""
    out = []
    for url in p.videos:
        job_id = keys.input_job_id(p.name, url)
        spec = input_spec(p, url, d.settings.redis_cluster)
        streams = {"results_stream": spec.output, "deadletter_stream": spec.deadletter}
        job: Job | None = None
        why: str | None = "redis is unreachable: not asked, as it failed a moment ago"
        if asked:
            job, why = await _asked(d.jobs.get(job_id))
            asked = why is None  # failed once: the next inputs are not asked (each would wait)
        if why is not None:
            out.append(VideoInput(url=keys.public_url(url), job_id=job_id, status="unknown", holder="",
                                  attempt=0, processed=0, last_error=why, **streams))
            continue
        if job is None:  # not registered yet (Redis was down at start)
            out.append(VideoInput(url=keys.public_url(url), job_id=job_id, status="pending", holder="",
                                  attempt=0, processed=0, **streams))
            continue
        # a failed input's own error (a file that is gone); else the reader's last reopening
        error = job.error if job.status == "failed" and job.error else job.progress.get("last_error")
        seen = job.progress.get("last_frame_at")
        out.append(VideoInput(url=keys.public_url(url), job_id=job_id, status=job.status, holder=job.holder,
                              attempt=job.attempt, processed=job.counts.get("processed", 0),
                              last_error=str(error) if error else None,
                              last_frame_at=str(seen) if seen else None, **streams))
    return out


def _acked(d: Daemon, pipeline: str, reason: str) -> float:
    value = d.metrics.registry.get_sample_value(
        "sightstream_frames_acked_without_result_total", {"pipeline": pipeline, "reason": reason})
    return value or 0.0


def _quantile(ordered: list[int], q: float) -> float | None:
    return float(ordered[round(q * (len(ordered) - 1))]) if ordered else None


async def _asked(call: Awaitable[T]) -> tuple[T | None, str | None]:
    """Redis' answer, or None and why it cannot be had: unreachable, or no answer within
    ASK_LIMIT_S (a hung node would hold the figures for a minute and more, through retries)."""
    try:
        return await asyncio.wait_for(call, ASK_LIMIT_S), None
    except TimeoutError:  # first: it is an OSError too
        return None, f"redis is unreachable: no answer within {ASK_LIMIT_S:g} s"
    except (RedisError, OSError) as e:
        return None, f"redis is unreachable: {e}"


async def _sources(
    d: Daemon, p: PipelineSettings, run: PipelineRun | None, readers: bool = True
) -> tuple[list[Source] | None, str | None]:
    """Each source's backlog (and reader, where one daemon reads it), or None and why: Redis
    cannot be asked."""
    streams = list(run.ingest.found) if run else []
    backlog, why = await _asked(group_backlog(d.client, p.name, streams))
    if backlog is None:
        return None, why
    leases = run.ingest.leases if run and readers else None  # the list shows no sources: not asked
    held_by: list[str | None] = [None] * len(backlog)
    if leases is not None:
        owners, why = await _asked(leases.owners([b.stream for b in backlog]))
        if owners is None:
            return None, why
        held_by = owners
    upstream = next((q for q in d.settings.pipelines if q.name == p.prompt_from), None)

    def source(stream: str) -> str:  # a chained pipeline reads its upstream's results of a source
        return (keys.source_of(upstream.output, upstream.name, stream) if upstream else None) or stream

    listed = []
    for b, reader in zip(backlog, held_by):
        of = source(b.stream)
        listed.append(Source(stream=b.stream, source=of, pending=b.pending, lag=b.lag,
                             last_delivered_id=b.last_delivered_id, reader=reader,
                             dead_lettered=d.snapshots.dead_count(p.name, of),
                             clock_skew_ms=d.clock_skews.of(p.name, b.stream)))
    return listed, None
