"""The control plane's aiohttp application. Each resource module registers its routes on its
own `Api`; they are added here, and `/openapi.json` is assembled from the same registrations."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from sightstream.control import health, jobs, models, openapi, page, pipelines, predict, prompts
from sightstream.control.browser_guard import browser_guard
from sightstream.control.errors import body_limits, json_errors, quiet_bad_http, require_token
from sightstream.control.pixel_budget import PixelBudget
from sightstream.control.state import DAEMON, OPENAPI, PIXELS
from sightstream.daemon.daemon import Daemon

APIS = [health.api, models.api, predict.api, pipelines.api, prompts.api, jobs.api, page.api, openapi.api]


# How aiohttp serves the app. keepalive_timeout: a connection must send a whole request's
# headers within this many seconds of opening (and of its last answer): with aiohttp's default
# (an hour) clients that sent a header line every few seconds held sockets for ever, before any
# token was asked for, until the daemon ran out of file descriptors. Above the idle timeouts of
# load balancers that reuse connections (60 s for AWS's), which would see them closed under them.
SERVER_OPTIONS: dict[str, Any] = {"keepalive_timeout": 75.0}


def make_app(daemon: Daemon) -> web.Application:
    control = daemon.settings.control
    quiet_bad_http()
    max_bytes = control.max_upload_bytes
    open_handlers = {op.handler for api in APIS for op in api.operations if op.open}
    app = web.Application(
        middlewares=[json_errors, browser_guard(control, open_handlers),
                     require_token(control, open_handlers), body_limits(max_bytes)],
        client_max_size=max_bytes,
    )
    app[DAEMON] = daemon
    app[PIXELS] = PixelBudget(control.predict_max_pixels)
    entries = list(daemon.catalogue)
    app[OPENAPI] = openapi.document(APIS, token=control.auth, path_values={
        "name": [p.name for p in daemon.settings.pipelines],
        "family": [e.family for e in entries], "variant": [e.variant for e in entries],
    })
    for api in APIS:
        api.add_to(app)
    return app
