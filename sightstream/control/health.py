"""Health and metrics: `/health` (a summary), `/health/live` (the event loop answers),
`/health/ready` (503 until Redis answers and the workers are up), `/metrics` (Prometheus)."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sightstream.control.state import DAEMON
from sightstream.daemon.daemon import Daemon

routes = web.RouteTableDef()


def _daemon(request: web.Request) -> Daemon:
    return request.app[DAEMON]


def _safe_url(url: str) -> str:
    """The Redis URL without its password."""
    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username or ''}:***@{parts.hostname}:{parts.port}"
        return urlunsplit(parts._replace(netloc=netloc))
    return url


@routes.get("/health/live")
async def live(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/health/ready")
async def ready(request: web.Request) -> web.Response:
    d = _daemon(request)
    redis_ok = await d.redis_ok()
    problems = []
    if not redis_ok:
        problems.append("redis is unreachable")
    if not d.ready:
        problems.append("workers are not up")
    if problems:
        return web.json_response({"status": "unavailable", "problems": problems}, status=503)
    return web.json_response({"status": "ready"})


@routes.get("/health")
async def summary(request: web.Request) -> web.Response:
    d = _daemon(request)
    redis_ok = await d.redis_ok()
    return web.json_response({
        "status": "ok" if redis_ok and d.ready else "degraded",
        "redis": {"url": _safe_url(d.settings.redis_url), "ok": redis_ok},
        "consumer": d.consumer,
        "devices": d.devices,
        "workers": [{"device": w.device, "busy": w.busy, "batches": w.batches} for w in d.workers],
        "models": d.manager.loaded(),
        "pipelines": d.pipelines(),
    })


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(_daemon(request).metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
