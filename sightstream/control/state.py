"""What every handler module shares: the typed application keys, and JSON replies built from
the same pydantic models the schema documents."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel

from sightstream.control.pixel_budget import PixelBudget
from sightstream.daemon.daemon import Daemon

DAEMON = web.AppKey("daemon", Daemon)
OPENAPI = web.AppKey("openapi", dict)
PIXELS = web.AppKey("predict_pixels", PixelBudget)


def reply(model: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(model.model_dump(mode="json"), status=status, headers=headers)
