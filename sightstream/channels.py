"""Following a Redis pub/sub channel through outages, the same way for every notice channel
(prompt changes, new and cancelled jobs): subscribe, catch up on what was missed while not
subscribed, then handle each message; a Redis error backs off and subscribes again."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from sightstream import log
from sightstream.stages.flow import RedisRetry, Stopped

_log = log.get(__name__)


async def follow_channel(
    client: Redis, channel: str, retry: RedisRetry, stop: asyncio.Event, *,
    caught_up: Callable[[], Awaitable[None]], on_message: Callable[[bytes], Awaitable[None]],
    tick: Callable[[], Awaitable[None]] | None = None, tick_s: float = 1.0,
) -> None:
    """Until stopped. `caught_up()` runs after every (re)subscription: notices sent while
    unsubscribed are lost. `tick()`, if given, runs every `tick_s` (a poll that covers anything
    else)."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
            await caught_up()
            retry.succeeded()
            next_tick = loop.time() + tick_s
            while not stop.is_set():
                message = await pubsub.get_message(timeout=min(1.0, tick_s))
                if message is not None and message.get("type") == "message":
                    await _survive(on_message(message["data"]), channel)
                if tick is not None and loop.time() >= next_tick:
                    await _survive(tick(), channel)
                    next_tick = loop.time() + tick_s
        except (RedisError, OSError) as e:
            try:
                await retry.failed(e)
            except Stopped:
                return
        finally:
            await pubsub.aclose()


async def _survive(call: Awaitable[None], channel: str) -> None:
    """A handler's Redis errors reach the retry loop; any other (a malformed notice someone
    published) is logged, and the channel is followed on."""
    try:
        await call
    except (RedisError, OSError):
        raise
    except Exception as e:  # noqa: BLE001 - one bad notice must not end the following
        _log.warning("notice_not_handled", channel=channel, error=repr(e))
