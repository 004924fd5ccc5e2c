"""Keeps a daemon's PromptBook current: a change notice (pub/sub on `sightstream:prompts`)
re-reads that pipeline's prompt at once; every (re)subscription re-reads them all, since
notices sent while unsubscribed are lost; and a poll every `poll_s` covers anything else."""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from sightstream import keys
from sightstream.metrics import Metrics
from sightstream.prompts import PromptBook
from sightstream.stages.flow import RedisRetry, Stopped


async def follow_prompts(client: Redis, book: PromptBook, metrics: Metrics, stop: asyncio.Event,
                         poll_s: float = 5.0) -> None:
    """Until stopped; Redis errors are survived with back-off."""
    retry = RedisRetry("prompts", metrics, stop)
    while not stop.is_set():
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(keys.PROMPT_CHANNEL)
            await book.refresh()  # whatever changed while we were not subscribed
            retry.succeeded()
            await _follow(pubsub, book, stop, poll_s)
        except (RedisError, OSError) as e:
            try:
                await retry.failed(e)
            except Stopped:
                return
        finally:
            await pubsub.aclose()


async def _follow(pubsub: Any, book: PromptBook, stop: asyncio.Event, poll_s: float) -> None:
    loop = asyncio.get_running_loop()
    next_poll = loop.time() + poll_s
    while not stop.is_set():
        message = await pubsub.get_message(timeout=min(1.0, poll_s))
        if message is not None and message.get("type") == "message":
            name = message["data"].decode()
            if name in book.pipelines:
                await book.refresh([name])
        if loop.time() >= next_poll:
            await book.refresh()
            next_poll = loop.time() + poll_s
