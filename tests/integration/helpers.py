"""Running daemons in the test's event loop against the suite's real redis-server."""

from __future__ import annotations

import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from sightstream.config import Settings
from sightstream.control.app import SERVER_OPTIONS, make_app
from sightstream.daemon.consumer import process_identity
from sightstream.daemon.daemon import Daemon
from tests.conftest import wait_for  # noqa: F401 - the tests import it from here too
from tests.fake_adapters import entry as fake_entry
from tests.tiny_models import constant_yolov8

TINY_ROWS = [[32, 32, 20, 20, 0.1, 0.9]] + [[0, 0, 1, 1, 0.0, 0.0]] * 20


def settings_for(redis_url: str, tmp_path: Path, pipelines: list[dict] | None = None,
                 fakes: dict[str, dict] | None = None, **extra: Any) -> Settings:
    """Settings with a tiny constant detector `tiny/det` as every pipeline's default model, and
    `fake/<name>` entries of the scripted test adapter (tests/fake_adapters.py)."""
    path = tmp_path / "tiny.onnx"
    if not path.exists():
        constant_yolov8(path, TINY_ROWS, classes=2, size=64, names={0: "cat", 1: "dog"})
    pipelines = pipelines or [{}]
    models: dict[str, dict] = {"tiny": {"det": {"backend": "onnx", "task": "detect", "path": str(path)}}}
    if fakes:
        models["fake"] = {name: fake_entry(**options) for name, options in fakes.items()}
    return Settings(**{
        "redis_url": redis_url,
        "devices": ["cpu"],
        "reclaim_min_idle_ms": 1000,
        "pipelines": [{"name": "people", "model": "tiny/det", **p} for p in pipelines],
        "models": models,
        "control": {"port": 0},
        **extra,
    })


class ServedAsInProduction(TestServer):
    """aiohttp's test server cancels a handler whose client went away; `sightstream run`'s
    server (aiohttp's default) lets it run on and reads fail. Tests see what users' daemons do."""

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        return web.AppRunner(self.app, **{**kwargs, **SERVER_OPTIONS, "handler_cancellation": False})


async def client_for(daemon: Daemon) -> TestClient:
    """A client of the daemon's control plane over a real socket (the caller closes it)."""
    client = TestClient(ServedAsInProduction(make_app(daemon)))
    await client.start_server()
    return client


@asynccontextmanager
async def serving(settings: Settings, host: str = "testhost"):
    """A running daemon and a client of its control plane."""
    async with running(settings, host) as daemon:
        client = await client_for(daemon)
        try:
            yield daemon, client
        finally:
            await client.close()


@asynccontextmanager
async def running(settings: Settings, host: str = "testhost"):
    daemon = Daemon(settings, host=host, discover_s=0.2)
    try:
        await daemon.start()  # a start that fails (bad config) still gets its clients closed
        yield daemon
    finally:
        await daemon.stop()


def entries(client: redis.Redis, key: str) -> list[tuple[str, dict[str, bytes]]]:
    return [
        (i.decode(), {k.decode(): v for k, v in fields.items()})
        for i, fields in client.xrange(key)
    ]


def pending(client: redis.Redis, key: str, group: str = "people") -> int:
    return client.xpending(key, group)["pending"]


def crashed_process() -> str:
    """The identity (daemon/consumer.py) of a process that ran on this machine and is gone:
    what a daemon killed with -9 leaves in its consumer-name lease."""
    crashed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = process_identity(crashed.pid)
    crashed.kill()
    crashed.wait()
    if dead is None:
        pytest.skip("needs Linux's /proc, of this PID namespace")
    return dead
