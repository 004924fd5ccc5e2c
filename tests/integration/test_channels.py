"""Following a notice channel: a malformed notice is logged and the channel followed on."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from sightstream.channels import follow_channel
from sightstream.metrics import Metrics
from sightstream.redis_conn import make_client
from sightstream.stages.flow import RedisRetry
from tests.conftest import wait_for

pytestmark = pytest.mark.integration


async def test_a_notice_its_handler_cannot_take_does_not_end_the_following(redis_url, sync_redis):
    client = make_client(redis_url)
    stop = asyncio.Event()
    seen: list[str] = []
    subscribed = asyncio.Event()

    async def caught_up() -> None:
        subscribed.set()

    async def handle(data: bytes) -> None:
        seen.append(data.decode())  # a non-UTF-8 notice raises here

    metrics = Metrics()
    following = asyncio.create_task(follow_channel(client, "test:notices", RedisRetry("t", metrics, stop), stop,
                                                   caught_up=caught_up, on_message=handle))
    try:
        with capture_logs() as logs:
            await asyncio.wait_for(subscribed.wait(), 5)
            sync_redis.publish("test:notices", b"\xff\xfe")
            sync_redis.publish("test:notices", b"new:1")
            await wait_for(lambda: seen == ["new:1"], 5, "the notice after the bad one")
        assert any(e["event"] == "notice_not_handled" and "UnicodeDecodeError" in e["error"] for e in logs)
        assert not following.done()
    finally:
        stop.set()
        await asyncio.wait_for(following, 5)
        await client.aclose(close_connection_pool=True)
