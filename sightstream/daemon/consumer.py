"""Stable consumer names: `host:slot`, where the slot is leased in Redis.

A restarted daemon takes the same name again (slot 0 on a host running one daemon) and so
drains the pending entries it left; two daemons on one host take different slots."""

from __future__ import annotations

import asyncio
import secrets
import socket

from redis.asyncio import Redis

from sightstream import keys
from sightstream.errors import SightstreamError
from sightstream.leases import RELEASE, RENEW

LEASE_MS = 15_000
RENEW_S = 5.0

class ConsumerLease:
    def __init__(self, client: Redis, slots: int, host: str | None = None) -> None:
        self._client = client
        self._slots = slots
        self.host = host or socket.gethostname()
        self._token = secrets.token_hex(8)
        self._key = ""
        self.name = ""

    async def acquire(self) -> str:
        for slot in range(self._slots):
            key = keys.consumer_slot(self.host, slot)
            if await self._client.set(key, self._token, nx=True, px=LEASE_MS):
                self._key, self.name = key, f"{self.host}:{slot}"
                return self.name
        raise SightstreamError(
            f"all {self._slots} consumer slots of host {self.host} are taken (raise consumer_slots)"
        )

    async def keep(self, stop: asyncio.Event) -> None:
        """Renew the lease until stopped; Redis errors are survived (the next renewal retries)."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), RENEW_S)
            except TimeoutError:
                pass
            try:
                await self._client.eval(RENEW, 1, self._key, self._token, LEASE_MS)
            except Exception:  # noqa: BLE001 - a lease renewal must never kill the daemon
                pass

    async def release(self) -> None:
        if self._key:
            try:
                await self._client.eval(RELEASE, 1, self._key, self._token)
            except Exception:  # noqa: BLE001
                pass
