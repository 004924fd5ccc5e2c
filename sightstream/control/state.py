"""The typed application key under which handlers find the daemon."""

from __future__ import annotations

from aiohttp import web

from sightstream.daemon.daemon import Daemon

DAEMON = web.AppKey("daemon", Daemon)
