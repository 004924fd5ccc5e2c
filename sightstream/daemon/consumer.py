"""Stable consumer names: `host:slot`, where the slot is leased in Redis.

A restarted daemon takes the same name again (slot 0 on a host running one daemon) and so
drains the pending entries it left; two daemons on one host take different slots. After a
crash (kill -9, out of memory) the dead process's lease has not expired yet: the lease names
its process (boot, PID namespace, PID and start time, on Linux), and a daemon of the same
host and PID namespace takes over a slot whose process is gone at once, instead of waiting
for the lease to lapse and leaving the frames to be reclaimed `reclaim_min_idle_ms` later.

The lease is renewed every 5 s. Should Redis answer that another daemon now holds our slot
(ours lapsed: a Redis outage, a paused process), two daemons would read under one name: the
lease is given up, a new slot taken, and every reader goes on under the new name (the readers
ask for the name at each call). Frames in flight are finished: publishing acknowledges by
entry ID, whoever's name they were read under, and the heartbeat moves them to the new name.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import Callable
from pathlib import Path

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
# Take a lease over only if it still holds what was read (its dead holder's token).
TAKE_OVER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) and 1 or 0
end
return 0
"""


def process_identity(pid: int) -> str | None:
    """`boot|pid namespace|pid|start time` of a process on this machine (Linux), else None:
    a PID alone may have been reused, a start time alone may be another namespace's. None too
    where /proc is not this PID namespace's own (a sandbox that did not mount it anew)."""
    try:
        if os.readlink("/proc/self") != str(os.getpid()):
            return None
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
        started = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
    return f"{boot}|{namespace}|{pid}|{started}"


def holder_is_gone(token: str) -> bool:
    """True only when the token names a process of this boot and PID namespace that surely no
    longer runs: no process has its PID, or one that started at another time has it. A token of
    another host's, another container's or an older version's, or a process whose /proc entry
    cannot be read (another user's, under hidepid): False."""
    identity, _, _ = token.rpartition("#")
    parts = identity.split("|")
    mine = process_identity(os.getpid())
    if len(parts) != 4 or mine is None or mine.split("|")[:2] != parts[:2] or not parts[2].isdigit():
        return False
    pid = int(parts[2])
    try:
        os.kill(pid, 0)  # unlike /proc, not hidden from other users
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    now = process_identity(pid)
    return now is not None and now.split("|")[3] != parts[3]  # the PID was reused


class ConsumerLease:
    def __init__(self, client: Redis, slots: int, host: str | None = None,
                 on_lost: Callable[[], None] = lambda: None) -> None:
        self._client = client
        self._slots = slots
        self.host = host or socket.gethostname()
        self._token = f"{process_identity(os.getpid()) or ''}#{secrets.token_hex(8)}"
        self._key = ""
        self._on_lost = on_lost
        self.name = ""
        self.renamed = 0
        self.inherited = False  # the name was taken over from a process gone (crashed): its jobs are ours

    async def acquire(self) -> str:
        for slot in range(self._slots):
            key = keys.consumer_slot(self.host, slot)
            taken = await self._client.set(key, self._token, nx=True, px=LEASE_MS)
            if taken or await self._take_from_gone(key):
                self._key, self.name = key, f"{self.host}:{slot}"
                return self.name
        raise SightstreamError(
            f"all {self._slots} consumer slots of host {self.host} are taken (raise consumer_slots)"
        )

    async def _take_from_gone(self, key: str) -> bool:
        """The slot's holder crashed (its process is gone): take its lease over now."""
        raw = await self._client.get(key)
        if raw is None:
            return False
        held = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        if not holder_is_gone(held):
            return False
        if not await self._client.eval(TAKE_OVER, 1, key, raw, self._token, LEASE_MS):
            return False
        pid = held.rpartition("#")[0].split("|")[2]
        _log.info("consumer_name_taken_from_a_gone_process", slot=key, previous_pid=pid)
        self.inherited = True
        return True

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
