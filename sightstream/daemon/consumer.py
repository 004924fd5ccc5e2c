"""Stable consumer names: `host:slot`, where the slot is leased in Redis.

A restarted daemon takes the same name again (slot 0 on a host running one daemon) and so
drains the pending entries it left; two daemons on one host take different slots.

The lease is renewed every 5 s. Should Redis answer that another daemon now holds our slot
(ours lapsed: a Redis outage, a paused process), two daemons would read under one name: the
lease is given up, a new slot taken, and every reader goes on under the new name (the readers
ask for the name at each call). Frames in flight are finished: publishing acknowledges by
entry ID, whoever's name they were read under, and the heartbeat moves them to the new name.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from sightstream import keys, log
from sightstream.errors import SightstreamError
from sightstream.leases import RELEASE, RENEW
from sightstream.metrics import Metrics
from sightstream.stages.flow import RedisRetry, Stopped, backoff_s, wait_or_stop, worth_logging

_log = log.get(__name__)
LEASE_MS = 15_000
RENEW_S = 5.0


class ConsumerLease:
    def __init__(self, client: Redis, slots: int, host: str | None = None,
                 on_lost: Callable[[], None] = lambda: None) -> None:
        self._client = client
        self._slots = slots
        self.host = host or socket.gethostname()
        self._token = secrets.token_hex(8)
        self._key = ""
        self._on_lost = on_lost
        self.name = ""
        self.renamed = 0

    async def acquire(self) -> str:
        for slot in range(self._slots):
            key = keys.consumer_slot(self.host, slot)
            if await self._client.set(key, self._token, nx=True, px=LEASE_MS):
                self._key, self.name = key, f"{self.host}:{slot}"
                return self.name
        raise SightstreamError(
            f"all {self._slots} consumer slots of host {self.host} are taken (raise consumer_slots)"
        )

    async def keep(self, stop: asyncio.Event, metrics: Metrics) -> None:
        """Renew the lease until stopped. Redis errors are survived (counted and logged as
        `consumer_lease`; the next renewal retries: a lapsed lease nobody took is simply taken
        again); a lease another daemon holds is replaced by a new slot."""
        retry = RedisRetry("consumer_lease", metrics, stop, consumer=self.name)
        while not stop.is_set():
            if await wait_or_stop(stop, RENEW_S):
                return
            try:
                held = await self._client.eval(RENEW, 1, self._key, self._token, LEASE_MS)
                retry.succeeded()
            except (RedisError, OSError) as e:
                retry.note(e)
                continue
            if not held:
                await self._replace(stop, retry)

    async def _replace(self, stop: asyncio.Event, retry: RedisRetry) -> None:
        old = self.name
        _log.warning("consumer_lease_lost", consumer=old,
                     reason="another daemon holds this name now; taking a new one")
        self._on_lost()
        full = 0
        while not stop.is_set():
            try:
                await retry.call(self.acquire)
            except Stopped:
                return
            except SightstreamError as e:  # every slot is taken: wait for one to lapse
                full += 1
                if worth_logging(full):
                    _log.warning("consumer_slots_full", error=str(e), attempt=full)
                await wait_or_stop(stop, backoff_s(full))
                continue
            self.renamed += 1
            _log.info("consumer_renamed", old=old, new=self.name)
            return

    async def release(self) -> None:
        if self._key:
            try:
                await self._client.eval(RELEASE, 1, self._key, self._token)
            except (RedisError, OSError):  # it expires by itself
                pass
