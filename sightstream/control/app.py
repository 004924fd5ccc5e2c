"""The control plane's aiohttp application. One module per resource adds its routes here."""

from __future__ import annotations

from aiohttp import web

from sightstream.control import health, models
from sightstream.control.errors import json_errors, require_token
from sightstream.control.state import DAEMON
from sightstream.daemon.daemon import Daemon


def make_app(daemon: Daemon) -> web.Application:
    control = daemon.settings.control
    app = web.Application(
        middlewares=[json_errors, require_token(control.token)],
        client_max_size=int(control.max_upload_mb * 1024 * 1024),
    )
    app[DAEMON] = daemon
    app.add_routes(health.routes)
    app.add_routes(models.routes)
    return app
