"""Leases in Redis: a key holding its owner's token with a TTL, renewed while the owner
lives. Used for stable consumer names (daemon/consumer.py), per-source readers
(stages/source_leases.py) and jobs (jobs/runner.py).

A lease is taken with `SET key token NX PX ttl`, renewed by compare-and-renew, released by
compare-and-delete; writes made under a lease check the token in the same Lua script (a
fence), so a holder that paused and lost its lease writes nothing."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from sightstream import log

_log = log.get(__name__)

# Renew if ours, else take it if free. 1: held by us now; 0: someone else holds it.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
"""
# Renew only if still ours. 1: renewed; 0: lost (expired, or another holder took it).
KEEP = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# Give it to another holder (ARGV[2]) if ours: 1 handed over; 0 not ours any more.
HAND_OVER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""
# Delete only if ours.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Lease:
    """One lease, held by one task: take it, keep it (renewed every ttl/3), give it back.
    `keep` calls `on_lost` once the lease is known lost, or cannot be proven held: Redis
    refused to renew it, or no renewal succeeded for a whole TTL."""

    def __init__(self, client: Redis, key: str, ttl_ms: int) -> None:
        self._client = client
        self.key = key
        self.ttl_ms = ttl_ms
        self.token = secrets.token_hex(16)

    async def acquire(self) -> bool:
        return bool(await self._client.set(self.key, self.token, nx=True, px=self.ttl_ms))

    async def renew(self) -> bool:
        return bool(await self._client.eval(KEEP, 1, self.key, self.token, self.ttl_ms))

    async def keep(self, on_lost: Callable[[str], None], stop: asyncio.Event,
                   on_error: Callable[[BaseException], None] = lambda e: None) -> None:
        """Renew every TTL/3 until stopped. A renewal that fails is retried at the next turn
        (`on_error` counts it); a lease found gone, or not renewed for a whole TTL, is lost."""
        renewed = time.monotonic()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.ttl_ms / 3000)
                return
            except TimeoutError:
                pass
            try:
                if not await self.renew():
                    on_lost("the lease expired or was taken by another holder")
                    return
                renewed = time.monotonic()
            except (RedisError, OSError) as e:
                on_error(e)
                if time.monotonic() - renewed > self.ttl_ms / 1000:
                    on_lost(f"no renewal for a whole TTL ({e})")
                    return

    async def release(self) -> None:
        try:
            await self._client.eval(RELEASE, 1, self.key, self.token)
        except (RedisError, OSError) as e:  # it expires by itself
            _log.warning("lease_release_failed", key=self.key, error=str(e))
