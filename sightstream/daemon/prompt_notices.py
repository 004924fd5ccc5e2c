"""Keeps a daemon's PromptBook current: a change notice (pub/sub on `sightstream:prompts`)
re-reads that pipeline's prompt at once; every (re)subscription re-reads them all, since
notices sent while unsubscribed are lost; and a poll every `poll_s` covers anything else."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from sightstream import keys
from sightstream.channels import follow_channel
from sightstream.metrics import Metrics
from sightstream.prompts import PromptBook
from sightstream.stages.flow import RedisRetry


async def follow_prompts(client: Redis, book: PromptBook, metrics: Metrics, stop: asyncio.Event,
                         poll_s: float = 5.0) -> None:
    """Until stopped; Redis errors are survived with back-off."""

    async def changed(data: bytes) -> None:
        if (name := data.decode()) in book.pipelines:
            await book.refresh([name])

    await follow_channel(client, keys.PROMPT_CHANNEL, RedisRetry("prompts", metrics, stop), stop,
                         caught_up=book.catch_up, on_message=changed, tick=book.refresh, tick_s=poll_s)
