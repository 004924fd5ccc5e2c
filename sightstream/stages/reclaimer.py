"""Reclaimer: takes over the group's entries that have sat unacknowledged for longer than
`reclaim_min_idle_ms` (their daemon died, or abandoned a stuck batch), so no frame is lost.

XAUTOCLAIM moves them to this consumer; their delivery counts (XPENDING) decide whether they
are tried again or dead-lettered (`max_deliveries`). Entries whose content is gone are
dead-lettered (`empty_entry`). Redis 7 reports those IDs in a third reply element, once, to one
claimer, and has already dropped them from the pending list, whatever their idle time; one this
daemon is still processing (trimmed while in flight) keeps its result. Redis 6.2 returns them
as nil entries that stay pending, so their IDs are recovered from XPENDING.

Every PRUNE_EVERY_S it also removes the group's consumers that hold nothing and have not read
for PRUNE_IDLE_MS: those of daemons gone (a container gets a new host name each time it is
made), which Redis would otherwise keep in every group for ever. One still alive that only
rested (a tracking source read by another daemon) is made again by its next read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import ResponseError

from sightstream import log
from sightstream.stages.pending import StreamReader, pending_entries

_log = log.get(__name__)

PRUNE_EVERY_S = 600.0
PRUNE_IDLE_MS = 3_600_000
# KEYS: the stream. ARGV: group, idle ms, this consumer. The consumers removed: none pending,
# idle that long, not this one; checked and removed in one step, so none reads meanwhile.
PRUNE = """
local removed = {}
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if f['pending'] == 0 and f['idle'] >= tonumber(ARGV[2]) and f['name'] ~= ARGV[3] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    removed[#removed + 1] = f['name']
  end
end
return removed
"""


class Reclaimer(StreamReader):
    op = "reclaim"

    def __init__(self, *args: Any, streams: Callable[[], list[str]], min_idle_ms: int, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._streams = streams
        self._min_idle_ms = min_idle_ms
        self.interval_s = min(5.0, min_idle_ms / 2000)
        self.reclaimed = 0
        self._pruned_at = time.monotonic()

    async def step(self) -> None:
        await self.sleep(self.interval_s)
        for stream in list(self._streams()):
            if self._stop.is_set() or self._in_flight.paused:
                return
            await self.reclaim(stream)
        if time.monotonic() - self._pruned_at >= PRUNE_EVERY_S:
            for stream in list(self._streams()):
                if self._stop.is_set():
                    return
                await self.prune_consumers(stream)
            self._pruned_at = time.monotonic()

    async def prune_consumers(self, stream: str, idle_ms: int = PRUNE_IDLE_MS) -> list[str]:
        """Remove the group's consumers on `stream` that hold nothing and have been idle
        `idle_ms`; their names."""
        try:
            removed = await self._client.eval(PRUNE, 1, stream, self._group, idle_ms, self._consumer)
        except ResponseError as e:  # the stream or group is gone: nothing to prune
            if "NOGROUP" in str(e) or "no such key" in str(e):
                return []
            raise
        names = [n.decode() for n in removed]
        if names:
            _log.info("consumers_removed", pipeline=self._p.name, source=stream, consumers=names,
                      why=f"nothing pending, idle over {idle_ms // 60000} min: gone daemons")
        return names

    async def reclaim(self, stream: str) -> None:
        cursor = "0-0"
        while not self._stop.is_set() and not self._in_flight.paused:
            room = await self._in_flight.take(self._p.max_in_flight)
            used = 0
            try:
                cursor, used = await self._claim_page(stream, cursor, room)
            finally:
                self._in_flight.give(room - used)
            if cursor in ("0-0", "0"):
                return

    async def _claim_page(self, stream: str, cursor: str, room: int) -> tuple[str, int]:
        reply: Any = await self._client.xautoclaim(
            stream, self._group, self._consumer, self._min_idle_ms, start_id=cursor, count=room
        )
        next_cursor = reply[0].decode()
        claimed = [(i, f) for i, f in reply[1] if i is not None]
        vanished = len(reply[1]) - len(claimed)  # Redis 6.2: nil entries, still pending with us
        deleted = [i.decode() for i in reply[2]] if len(reply) > 2 else []  # Redis 7
        used = 0
        if claimed or vanished:
            lo = cursor
            hi = "+" if next_cursor in ("0-0", "0") else next_cursor
            rows = await pending_entries(self._client, stream, self._group, self._consumer,
                                         lo, hi, room + self._in_flight.capacity)
            counts = {entry_id: times for entry_id, (times, _) in rows.items()}
            used += await self._admission.admit(stream, claimed, counts)
            if vanished:
                # Redis 6.2 lost their IDs: they are ours now, just claimed (idle ~0), neither
                # returned with content nor already in flight here.
                known = {i.decode() for i, _ in claimed}
                missing = [i for i, (_, idle) in rows.items()
                           if i not in known and idle < self._min_idle_ms / 2
                           and not self._in_flight.holds(stream, i)]
                used += await self._admission.admit_missing(stream, missing[:vanished], counts)
            self.reclaimed += len(claimed)
            self._metrics.frames_reclaimed.labels(self._p.name).inc(len(claimed))
            _log.info("frames_reclaimed", pipeline=self._p.name, source=stream,
                      count=len(claimed), vanished=vanished)
        for entry_id in deleted:  # already out of the pending list: written once, not acknowledged
            await self._admission.dead_letter_gone(stream, entry_id)
        return next_cursor, used
