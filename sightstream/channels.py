"""Following a Redis pub/sub channel through outages, the same way for every notice channel
(prompt changes, new and cancelled jobs): subscribe, catch up on what was missed while not
subscribed, then handle each message; a Redis error backs off and subscribes again."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from sightstream import log
from sightstream.redis_conn import refused_for_good
from sightstream.stages.flow import RedisRetry, Stopped, wait_or_stop

_log = log.get(__name__)
REFUSED_RETRY_S = 300.0  # a refused subscription is tried again this often (the ACL may be fixed)


async def follow_channel(
    client: Redis, channel: str, retry: RedisRetry, stop: asyncio.Event, *,
    caught_up: Callable[[], Awaitable[None]], on_message: Callable[[bytes], Awaitable[None]],
    tick: Callable[[], Awaitable[None]] | None = None, tick_s: float = 1.0,
) -> None:
    """Until stopped. `caught_up()` runs after every (re)subscription: notices sent while
    unsubscribed are lost. `tick()`, if given, runs every `tick_s` (a poll that covers anything
    else). A subscription Redis refuses for good (ACL: no `&sightstream:*` for the user) is
    said once, and only the poll goes on (the subscription tried again every REFUSED_RETRY_S)."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        answered = False
        try:
            await pubsub.subscribe(channel)
            await caught_up()
            next_tick = loop.time() + tick_s
            while not stop.is_set():
                # Redis's answer to SUBSCRIBE (or its refusal) comes with the first read: only
                # then has the subscription worked (counted a success before, a refusal was
                # retried at the shortest back-off for ever: 26 log lines a second)
                message = await pubsub.get_message(timeout=min(1.0, tick_s))
                if not answered:
                    answered = True
                    retry.succeeded()
                if message is not None and message.get("type") == "message":
                    await _survive(on_message(message["data"]), channel)
                if tick is not None and loop.time() >= next_tick:
                    await _survive(tick(), channel)
                    next_tick = loop.time() + tick_s
        except (RedisError, OSError) as e:
            if refused_for_good(e) and any(w in str(e).lower() for w in ("channel", "subscribe")):
                await pubsub.aclose()
                if not await _poll_only(channel, e, retry, stop, tick, tick_s):
                    return
                continue
            try:
                await retry.failed(e)
            except Stopped:
                return
        finally:
            await pubsub.aclose()


async def _poll_only(channel: str, error: BaseException, retry: RedisRetry, stop: asyncio.Event,
                     tick: Callable[[], Awaitable[None]] | None, tick_s: float) -> bool:
    """Redis refuses the subscription: the poll alone, for REFUSED_RETRY_S. False: stopped."""
    _log.warning("channel_refused", channel=channel, error=str(error),
                 consequence=f"changes are seen by polling{f' every {tick_s:g} s' if tick else ''}, not "
                             "at once; give the daemon's Redis user the channel (&sightstream:*)")
    until = asyncio.get_running_loop().time() + REFUSED_RETRY_S
    while asyncio.get_running_loop().time() < until:
        if await wait_or_stop(stop, tick_s if tick else REFUSED_RETRY_S):
            return False
        if tick is not None:
            try:
                await _survive(tick(), channel)
            except (RedisError, OSError) as e:
                retry.note(e)
    return True


async def _survive(call: Awaitable[None], channel: str) -> None:
    """A handler's Redis errors reach the retry loop; any other (a malformed notice someone
    published) is logged, and the channel is followed on."""
    try:
        await call
    except (RedisError, OSError):
        raise
    except Exception as e:  # noqa: BLE001 - one bad notice must not end the following
        _log.warning("notice_not_handled", channel=channel, error=repr(e))
