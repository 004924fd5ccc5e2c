"""Models, Mozo-compatible: the catalogue, what is loaded, and explicit load/unload/cleanup."""

from __future__ import annotations

from aiohttp import web

from sightstream.control.errors import error_response
from sightstream.control.state import DAEMON
from sightstream.errors import ModelError, ModelNotAvailable, UnknownModel
from sightstream.models.manager import ModelTooLarge

routes = web.RouteTableDef()


def _model_id(request: web.Request) -> str:
    return f"{request.match_info['family']}/{request.match_info['variant']}"


def _model_error(e: ModelError) -> web.Response:
    if isinstance(e, UnknownModel):
        return error_response(404, str(e))
    if isinstance(e, ModelNotAvailable):
        return error_response(409, str(e), "model_not_available")
    if isinstance(e, ModelTooLarge):
        return error_response(507, str(e), "insufficient_memory")
    return error_response(409, str(e), "model_error")


@routes.get("/models")
async def catalogue(request: web.Request) -> web.Response:
    d = request.app[DAEMON]
    models = []
    for entry in d.catalogue:
        info = entry.describe()
        info["loaded"] = d.manager.is_loaded(entry.id)
        models.append(info)
    return web.json_response({"models": models})


@routes.get("/models/loaded")
async def loaded(request: web.Request) -> web.Response:
    return web.json_response({"models": request.app[DAEMON].manager.loaded()})


@routes.get("/models/{family}/{variant}/info")
async def info(request: web.Request) -> web.Response:
    d = request.app[DAEMON]
    try:
        entry = d.catalogue.get(_model_id(request))
    except ModelError as e:
        return _model_error(e)
    body = entry.describe()
    body["options"] = entry.options
    body["loaded_on"] = [m for m in d.manager.loaded() if m["model"] == entry.id]
    return web.json_response(body)


@routes.post("/models/{family}/{variant}/load")
async def load(request: web.Request) -> web.Response:
    d = request.app[DAEMON]
    device = request.query.get("device") or min(d.devices, key=d.manager.used_mb)
    if device not in d.devices:
        return error_response(400, f"no worker owns device {device!r}; devices: {', '.join(d.devices)}")
    try:
        return web.json_response(await d.manager.load(_model_id(request), device, d.executor_for(device)))
    except ModelError as e:
        return _model_error(e)


@routes.post("/models/{family}/{variant}/unload")
async def unload(request: web.Request) -> web.Response:
    d = request.app[DAEMON]
    model_id = _model_id(request)
    try:
        d.catalogue.get(model_id)
        devices = d.manager.unload(model_id, request.query.get("device"))
    except ModelError as e:
        return _model_error(e)
    if not devices:
        return error_response(404, f"model {model_id} is not loaded", "not_loaded")
    return web.json_response({"model": model_id, "unloaded_from": devices})


@routes.post("/models/cleanup")
async def cleanup(request: web.Request) -> web.Response:
    try:
        seconds = float(request.query.get("inactive_seconds", "600"))
        if seconds < 0:
            raise ValueError
    except ValueError:
        return error_response(400, "inactive_seconds must be a number of seconds >= 0")
    return web.json_response({"unloaded": request.app[DAEMON].manager.cleanup(seconds)})
