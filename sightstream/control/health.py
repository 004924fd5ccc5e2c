"""Health and metrics: `/health` (a summary), `/health/live` (the event loop answers),
`/health/ready` (503 until Redis answers and the workers are up), `/metrics` (Prometheus)."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from sightstream.control.api import TOKEN_NAME, Api, Resp
from sightstream.control.models import LoadedModel
from sightstream.control.state import DAEMON, reply
from sightstream.redis_conn import safe_url

api = Api("health")


class Live(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    problems: list[str] = []


class RedisHealth(BaseModel):
    url: str
    ok: bool


class WorkerHealth(BaseModel):
    device: str
    kind: str  # frames | text (text models' calls, beside the frames)
    busy: bool
    batches: int


class Health(BaseModel):
    status: str  # ok | degraded
    redis: RedisHealth
    consumer: str
    devices: list[str]
    workers: list[WorkerHealth]
    models: list[LoadedModel]
    pipelines: list[dict[str, Any]]


@api.get("/health/live", "The event loop answers", open=True, responses={200: Resp("Alive", Live)})
async def live(request: web.Request) -> web.Response:
    return reply(Live(status="ok"))


@api.get("/health/ready", "Redis answers and the workers are up", open=True,
         responses={200: Resp("Ready", Ready), 503: Resp("Not ready: `problems` says why", Ready)})
async def ready(request: web.Request) -> web.Response:
    d = request.app[DAEMON]
    problems = []
    if (redis_problem := await d.redis_problem()) is not None:
        problems.append(redis_problem)
    if not d.ready:
        problems.append("workers are not up")
    if problems:
        if d.settings.control.auth and TOKEN_NAME not in request:
            # open to probes: what is wrong, not Redis's error (its hosts, ports, TLS detail)
            problems = [p.split(": ", 1)[0] for p in problems]
        return reply(Ready(status="unavailable", problems=problems), 503)
    return reply(Ready(status="ready"))


@api.get("/health", "A summary: Redis, devices, workers, loaded models, pipelines",
         responses={200: Resp("The summary", Health)})
async def summary(request: web.Request) -> web.Response:
    d = request.app[DAEMON]
    redis_ok = await d.redis_ok()
    return reply(Health(
        status="ok" if redis_ok and d.ready else "degraded",
        redis=RedisHealth(url=safe_url(d.settings.redis_url), ok=redis_ok),
        consumer=d.consumer,
        devices=d.devices,
        workers=[WorkerHealth(device=w.device, kind=w.kind, busy=w.busy, batches=w.batches)
                 for w in d.workers + d.text_workers],
        models=[LoadedModel(**m) for m in d.manager.loaded()],
        pipelines=d.pipelines(),
    ))


@api.get("/metrics", "Prometheus metrics, all prefixed sightstream_", open=True,
         responses={200: Resp("Prometheus text format", media="text/plain")})
async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[DAEMON].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
