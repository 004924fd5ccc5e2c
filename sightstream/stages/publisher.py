"""Publisher: acknowledges each frame and publishes its result (or dead-letter entry) in one
atomic server-side step, so a retry, or a second daemon that processed a reclaimed frame,
never publishes twice: the script XACKs, and XADDs only if that XACK acknowledged the entry.

Outcomes are published in rounds: whatever is queued (up to `round_size`) goes out in one
pipelined round trip. A failed round is retried (the script makes retries harmless) until it
succeeds or shutdown gives up, in which case the frames stay pending for another daemon.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from sightstream import keys, log
from sightstream.frames import (
    Acked,
    DeadLettered,
    Outcome,
    Published,
    deadletter_fields,
    now_ms,
)
from sightstream.metrics import Metrics
from sightstream.redis_conn import Lua, run_pipelined
from sightstream.stages.flow import STOP, backoff_s, drain_nowait, worth_logging

_log = log.get(__name__)
DROP_LOG_EVERY_S = 10.0

# KEYS: source stream, output stream. ARGV: group, entry id, maxlen (0: no cap), field, value, ...
ACK_THEN_PUBLISH = """
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if acked == 1 then
  if ARGV[3] == '0' then
    redis.call('XADD', KEYS[2], '*', unpack(ARGV, 4))
  else
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 4))
  end
end
return acked
"""


# KEYS: marker, dead-letter stream. ARGV: marker TTL ms, maxlen (0: no cap), field, value, ...
RECORD_ONCE = """
if redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  if ARGV[2] == '0' then
    redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
  else
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
  end
  return 1
end
return 0
"""
RECORD_TTL_MS = 86_400_000


class Publisher:
    def __init__(
        self, client: Redis, inq: asyncio.Queue, metrics: Metrics, maxlen: dict[str, int],
        round_size: int = 256,
    ) -> None:
        self._client = client
        self._in = inq
        self._metrics = metrics
        self._maxlen = maxlen  # per pipeline
        self._round_size = round_size
        self._script = Lua(ACK_THEN_PUBLISH)
        self._record = Lua(RECORD_ONCE)
        self.published = 0
        self._dropped: dict[str, int] = {}  # stale drops since the last log line, per pipeline
        self._dropped_logged = 0.0

    async def run(self) -> None:
        stopped = False
        while not stopped and (first := await self._in.get()) is not STOP:
            outcomes, stopped = drain_nowait(self._in, first, self._round_size)
            await self.publish(outcomes)

    async def publish(self, outcomes: list[Outcome]) -> None:
        failures = 0
        while True:
            try:
                replies = await self._round(outcomes)
                break
            except RedisError as e:
                failures += 1
                self._metrics.redis_errors.labels("publish").inc()
                if worth_logging(failures):
                    _log.warning("publish_failed_retrying", frames=len(outcomes), error=str(e),
                                 failures=failures)
                await asyncio.sleep(backoff_s(failures))
        for outcome, reply in zip(outcomes, replies):
            # 1: acknowledged (or recorded) by this round; 0: another daemon or an earlier try did
            self._account(outcome, bool(reply))
            outcome.frame.release()

    async def _round(self, outcomes: list[Outcome]) -> list:
        now = now_ms()

        def fill(pipe: Any) -> None:
            for o in outcomes:
                f = o.frame
                group = keys.group(f.pipeline)
                if isinstance(o, Acked):
                    pipe.xack(f.stream, group, f.entry_id)
                    continue
                if isinstance(o, Published):
                    fields = dict(o.fields)
                    fields["latency_ms"] = str(max(0, now - f.ts_ms))
                else:
                    fields = deadletter_fields(f, o.reason, o.error)
                pairs = [item for field in fields.items() for item in field]
                maxlen = self._maxlen.get(f.pipeline, 0)
                if isinstance(o, DeadLettered) and not o.pending:  # nothing left to acknowledge
                    marker = keys.recorded_marker(f.pipeline, f.stream, f.entry_id)
                    self._record.queue(pipe, [marker, o.stream], [RECORD_TTL_MS, maxlen, *pairs])
                else:
                    self._script.queue(pipe, [f.stream, o.stream], [group, f.entry_id, maxlen, *pairs])

        return await run_pipelined(self._client, fill, self._script, self._record)

    def _account(self, o: Outcome, acked: bool) -> None:
        m, name = self._metrics, o.frame.pipeline
        if isinstance(o, Acked):
            m.frames_acked.labels(name, o.reason).inc()
            if o.reason == "stale":
                self._note_drop(name)
        elif not acked:
            m.publish_duplicates.labels(name).inc()
        elif isinstance(o, Published):
            self.published += 1
            m.frames_published.labels(name).inc()
            m.e2e_latency_seconds.labels(name).observe(max(0, now_ms() - o.frame.ts_ms) / 1000)
        elif isinstance(o, DeadLettered):
            m.frames_dead_lettered.labels(name, o.reason).inc()
            _log.info("frame_dead_lettered", pipeline=name, source=o.frame.source,
                      frame_id=o.frame.frame_id, reason=o.reason, error=o.error)

    def _note_drop(self, pipeline: str) -> None:
        """Stale drops are logged as a summary at most every 10 s: under overload they are many."""
        self._dropped[pipeline] = self._dropped.get(pipeline, 0) + 1
        now = time.monotonic()
        if now - self._dropped_logged >= DROP_LOG_EVERY_S:
            _log.warning("stale_frames_dropped", counts=self._dropped)
            self._dropped, self._dropped_logged = {}, now
