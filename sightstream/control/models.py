"""Models, Mozo-compatible: the catalogue, what is loaded, and explicit load/unload/cleanup."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from sightstream.control.api import Api, ApiError, Resp, read_query
from sightstream.control.openapi import error
from sightstream.control.state import DAEMON, reply
from sightstream.daemon.daemon import Daemon
from sightstream.errors import ModelError, ModelNotAvailable, UnknownModel
from sightstream.models.manager import LoadTimeout, ModelInUse, ModelTooLarge

api = Api("models")


class ModelInfo(BaseModel):
    model: str
    family: str
    variant: str
    backend: str
    task: str
    available: bool
    licence: str
    description: str


class CatalogueModel(ModelInfo):
    loaded: bool


class Catalogue(BaseModel):
    models: list[CatalogueModel]


class LoadedModel(BaseModel):
    model: str
    device: str
    memory_mb: float
    loaded_at: float
    last_used: float
    uses: int
    in_use: int


class LoadedModels(BaseModel):
    models: list[LoadedModel]


class ModelDetail(ModelInfo):
    options: dict[str, Any]
    loaded_on: list[LoadedModel]


class Unloaded(BaseModel):
    model: str
    unloaded_from: list[str]


class Evicted(BaseModel):
    model: str
    device: str


class CleanedUp(BaseModel):
    unloaded: list[Evicted]


class DeviceQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")
    device: str | None = Field(None, pattern=r"^(cpu|cuda:\d+)$",
                               description="cpu or cuda:N; default: the least used device")


class CleanupQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")
    inactive_seconds: float = Field(600, ge=0, allow_inf_nan=False,
                                    description="unload models unused for this long")


def model_id(request: web.Request) -> str:
    return f"{request.match_info['family']}/{request.match_info['variant']}"


def model_error(e: ModelError) -> ApiError:
    if isinstance(e, UnknownModel):
        return ApiError(404, str(e))
    if isinstance(e, ModelNotAvailable):
        return ApiError(409, str(e), "model_not_available")
    if isinstance(e, ModelTooLarge):
        return ApiError(507, str(e), "insufficient_memory")
    if isinstance(e, ModelInUse):
        return ApiError(409, str(e), "model_in_use")
    if isinstance(e, LoadTimeout):
        return ApiError(504, str(e), "timeout")
    return ApiError(409, str(e), "model_error")


MODEL_ERRORS = {
    404: error("No such model in the catalogue"),
    409: error("The model's weights are not on this machine, or it failed to load"),
    507: error("The model does not fit the device's memory budget"),
}


@api.get("/models", "The catalogue", responses={200: Resp("Every model", Catalogue)})
async def catalogue(request: web.Request) -> web.Response:
    d = request.app[DAEMON]
    return reply(Catalogue(models=[
        CatalogueModel(**entry.describe(), loaded=d.manager.is_loaded(entry.id)) for entry in d.catalogue
    ]))


@api.get("/models/loaded", "Models loaded on this daemon's devices",
         responses={200: Resp("Loaded models", LoadedModels)})
async def loaded(request: web.Request) -> web.Response:
    return reply(LoadedModels(models=request.app[DAEMON].manager.loaded()))


@api.get("/models/{family}/{variant}/info", "One model: its entry, options and where it is loaded",
         responses={200: Resp("The model", ModelDetail), 404: MODEL_ERRORS[404]})
async def info(request: web.Request) -> web.Response:
    d = request.app[DAEMON]
    try:
        entry = d.catalogue.get(model_id(request))
    except ModelError as e:
        raise model_error(e) from None
    # `task` travels among the options to the adapter; it is shown once, as the entry's task
    options = {k: v for k, v in entry.options.items() if k != "task"}
    return reply(ModelDetail(**entry.describe(), options=options,
                             loaded_on=[m for m in d.manager.loaded() if m["model"] == entry.id]))


@api.post("/models/{family}/{variant}/load",
          "Load a model (on ?device=, else where it is loaded, else the least used device); a model "
          "loaded already whose weights file has changed since is loaded again from it",
          query=DeviceQuery,
          responses={200: Resp("Loaded (the first device's, where it is loaded on several)", LoadedModel),
                     **MODEL_ERRORS,
                     504: error("The load took longer than manager.load_timeout_s (code timeout)"),
                     404: error("No such model (not_found), or no worker owns that device (unknown_device)")})
async def load(request: web.Request) -> web.Response:
    d = request.app[DAEMON]
    model = model_id(request)
    device = read_query(request, DeviceQuery).device
    if device is not None:
        _check_device(d, device)
    if device is None:  # where it is loaded (each copy is checked for a new file), else the least used
        where = [dev for dev in d.devices if d.manager.is_loaded(model, dev)]
        devices = where or [min(d.devices, key=d.manager.used_mb)]
    else:
        devices = [device]
    answers: list[dict] = []
    for dev in devices:
        try:
            answers.append(await d.worker_for(dev, model).load(model))
        except ModelError as e:
            if answers:  # a reload done on some devices: they run the new file now
                e.args = (f"{e}; on {', '.join(a['device'] for a in answers)} the model was loaded "
                          "(from its new file, where it changed) before this",)
            raise model_error(e) from None
    return reply(LoadedModel(**answers[0]))


@api.post("/models/{family}/{variant}/unload", "Unload a model (from ?device=, else everywhere)",
          query=DeviceQuery,
          responses={200: Resp("Unloaded", Unloaded),
                     404: error("No such model, it is not loaded (code not_loaded), or no worker owns "
                                "that device (unknown_device)"),
                     409: error("A call is using it now (code model_in_use): try again when idle")})
async def unload(request: web.Request) -> web.Response:
    d = request.app[DAEMON]
    mid = model_id(request)
    device = read_query(request, DeviceQuery).device
    if device is not None:
        _check_device(d, device)
    try:
        d.catalogue.get(mid)
        devices = d.manager.unload(mid, device)
    except ModelError as e:
        raise model_error(e) from None
    if not devices:
        raise ApiError(404, f"model {mid} is not loaded", "not_loaded")
    return reply(Unloaded(model=mid, unloaded_from=devices))


def _check_device(d: Daemon, device: str) -> None:
    if device not in d.devices:
        raise ApiError(404, f"no worker owns device {device!r}; devices: {', '.join(d.devices)}",
                       "unknown_device")


@api.post("/models/cleanup", "Unload models unused for ?inactive_seconds= (default 600)",
          query=CleanupQuery, responses={200: Resp("What was unloaded", CleanedUp)})
async def cleanup(request: web.Request) -> web.Response:
    seconds = read_query(request, CleanupQuery).inactive_seconds
    return reply(CleanedUp(unloaded=request.app[DAEMON].manager.cleanup(seconds)))
