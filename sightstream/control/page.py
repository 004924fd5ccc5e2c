"""The live page: `GET /` (plain HTML with a little inline JavaScript, nothing loaded from
elsewhere), `GET /sources` (each source's latest result, what the page polls every second),
and `GET /sources/{pipeline}/{source}/latest.jpg` (that frame with its result drawn on it,
drawn on request and cached per result; an ETag, 304 when unchanged).

The page itself holds no data, so it is served without the token; it sends the token with
every request it makes, taken once from the URL (`/#token=…`: a fragment, never sent to a
server or written to a log) or asked for."""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from importlib import resources

from aiohttp import web
from pydantic import BaseModel, Field

from sightstream.control.api import Api, ApiError, Resp
from sightstream.control.openapi import error
from sightstream.control.state import DAEMON, reply
from sightstream.daemon.snapshots import Snapshot, Snapshots, render

api = Api("page")
PAGE = resources.files("sightstream.control").joinpath("static/page.html").read_text()


class SourceView(BaseModel):
    pipeline: str
    source: str
    seq: int = Field(description="this daemon's count of results for the source")
    version: str = Field(description="the latest result's version on this daemon: latest.jpg's ETag")
    ts_ms: int = Field(description="the frame's capture time")
    latency_ms: int = Field(description="capture to publication")
    model: str
    task: str
    prompt_version: int | None
    summary: str = Field(description="one line of what the result says")
    dead_lettered: int = Field(description="this source's frames this daemon dead-lettered since it started")
    read: int = Field(description="this source's frames this daemon read since it started")


class SourceList(BaseModel):
    sources: list[SourceView]


@api.get("/", "The live page: every source's latest frame with its result drawn on it", open=True,
         responses={200: Resp("The page", media="text/html")})
async def page(request: web.Request) -> web.Response:
    # Never inside another site's frame (a page there could trick a click on it), nor read as
    # anything but HTML.
    return web.Response(text=PAGE, content_type="text/html",
                        headers={"Cache-Control": "no-cache", "X-Frame-Options": "DENY",
                                 "Content-Security-Policy": "frame-ancestors 'none'",
                                 "X-Content-Type-Options": "nosniff"})


@api.get("/sources", "Each source's latest result on this daemon (what the page shows)",
         responses={200: Resp("The sources", SourceList)})
async def list_sources(request: web.Request) -> web.Response:
    snapshots = request.app[DAEMON].snapshots
    return reply(SourceList(sources=[
        SourceView(**s.describe(), dead_lettered=snapshots.dead_count(s.pipeline, s.source),
                   read=snapshots.read_count(s.pipeline, s.source))
        for s in snapshots.list()]))


@api.get("/sources/{pipeline}/{source:.+}/latest.jpg", "A source's latest frame with its result drawn on it",
         responses={200: Resp("The frame", media="image/jpeg", headers={"ETag": "the result's version"}),
                    304: Resp("Unchanged since the ETag given in If-None-Match"),
                    404: error("No result of that pipeline and source on this daemon yet")})
async def latest(request: web.Request) -> web.Response:
    d = request.app[DAEMON]
    pipeline, source = request.match_info["pipeline"], request.match_info["source"]
    snap = d.snapshots.get(pipeline, source)
    if snap is None:
        raise ApiError(404, f"no result of pipeline {pipeline!r} for source {source!r} on this daemon yet")
    etag = f'"{snap.version}"'
    # weak comparison (RFC 9110): W/"7" matches "7"; * matches any
    if any(tag.value in (str(snap.version), "*") for tag in request.if_none_match or ()):
        return web.Response(status=304, headers={"ETag": etag})
    jpeg = d.snapshots.rendered(snap)
    if jpeg is None:
        try:
            jpeg = await _drawing(d.page_pool, d.snapshots, snap)
        except Exception as e:  # noqa: BLE001 - a frame Pillow reads but cannot draw on
            raise ApiError(422, f"the latest frame cannot be drawn: {e}") from None
        d.snapshots.keep_rendered(snap, jpeg)
    return web.Response(body=jpeg, content_type="image/jpeg",
                        headers={"ETag": etag, "Cache-Control": "no-cache"})


async def _drawing(pool: Executor, snapshots: Snapshots, snap: Snapshot) -> bytes:
    """Draw a snapshot in the page's own thread (not the decode pool), once per version."""
    drawing = snapshots.drawing
    running = drawing.get(snap.version)
    if running is None:
        running = drawing[snap.version] = asyncio.get_running_loop().run_in_executor(pool, render, snap)
        running.add_done_callback(lambda _: drawing.pop(snap.version, None))
    return await asyncio.shield(running)
