"""Publisher: writes each frame's result (or dead-letter entry) and acknowledges the frame in
one atomic server-side step, so a retry, or a second daemon that processed a reclaimed frame,
never publishes twice, and a write that fails never leaves the frame acknowledged.

The script checks that the entry is still pending in the group, XADDs, then XACKs. An XADD
that Redis refuses (the output key holds another type, Redis is out of memory) aborts the
script before the XACK: the frame stays pending. Such a frame is tried again with back-off, up
to its pipeline's `max_deliveries`, then dead-lettered (`publish_error`); other frames of the
round, and other sources, are not held up. A write refused because Redis is at maxmemory
(OOM) is tried again, held, until Redis has room: that is no fault of the frame.

Outcomes are published in rounds: whatever is queued (up to `round_size`) goes out in one
pipelined round trip. A round that cannot reach Redis is retried (the script makes retries
harmless) until it succeeds or the daemon stops, in which case its frames stay pending for
another daemon (or this one's successor) to process again.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from sightstream import keys, log
from sightstream.frames import (
    Acked,
    DeadLettered,
    Frame,
    Outcome,
    Published,
    deadletter_fields,
    now_ms,
)
from sightstream.metrics import Children, Metrics
from sightstream.redis_conn import Lua, lua_xadd, out_of_memory, run_pipelined
from sightstream.stages.flow import STOP, RedisRetry, Stopped, backoff_s, drain_nowait

_log = log.get(__name__)
DROP_LOG_EVERY_S = 10.0
OOM_RETRY_MAX_S = 5.0  # a write Redis refused for want of memory is tried again at least this often
OOM_SAY_EVERY_S = 30.0
RECENT = 1000  # latencies kept per pipeline

# KEYS: source stream, output stream. ARGV: group, maxlen (0: no cap), the output's TTL in ms
# (0: none; renewed by each write, so a retired camera's results go), then per entry: its id,
# the count of field/value items that follow, the items. Per entry, in order: 1 when written
# and acknowledged, 0 when no longer pending (another daemon, or an earlier try, finished it;
# or the group is gone), or Redis' error when it refused the XADD (the entry stays pending).
# One call per (source, output) pair of a round: both keys carry the source's hash tag.
PUBLISH_THEN_ACK = """
local out = {}
local wrote = false
local i = 4
while i <= #ARGV do
  local id, n = ARGV[i], tonumber(ARGV[i + 1])
  local pending = redis.pcall('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if type(pending) ~= 'table' or pending.err or #pending == 0 then
    out[#out + 1] = 0
  else
    local added
    if ARGV[2] == '0' then
      added = redis.pcall('XADD', KEYS[2], '*', unpack(ARGV, i + 2, i + 1 + n))
    else
      added = redis.pcall('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, i + 2, i + 1 + n))
    end
    if type(added) == 'table' and added.err then
      out[#out + 1] = added.err
    else
      redis.call('XACK', KEYS[1], ARGV[1], id)
      out[#out + 1] = 1
      wrote = true
    end
  end
  i = i + 2 + n
end
if wrote and ARGV[3] ~= '0' then
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
return out
"""


# An outcome of an entry no longer pending (trimmed while in flight; see Frame.pending).
# KEYS: marker, output or dead-letter stream. ARGV: marker TTL ms, maxlen (0: no cap), the
# output's TTL ms (0: none), field, value, ... The marker is set only after the write, so a
# refused write can be tried again.
RECORD_ONCE = f"""
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
{lua_xadd("KEYS[2]", "ARGV[2]", 4)}
if ARGV[3] ~= '0' then
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
return 1
"""
RECORD_TTL_MS = 86_400_000


@dataclass(slots=True)
class _Retry:
    due: float  # event-loop time
    outcome: Outcome


class Publisher:
    def __init__(
        self, client: Redis, inq: asyncio.Queue, metrics: Metrics, maxlen: dict[str, int],
        max_deliveries: dict[str, int] | None = None, round_size: int = 256, *, stop: asyncio.Event,
        ttl_ms: dict[str, int] | None = None,
        on_published: Callable[[Frame, dict[str, Any]], None] | None = None,
        on_dead_lettered: Callable[[Frame], None] | None = None,
    ) -> None:
        self._client = client
        self._retry = RedisRetry("publish", metrics, stop)
        self._in = inq
        self._metrics = metrics
        self._maxlen = maxlen  # per pipeline
        self._ttl_ms = ttl_ms or {}  # per pipeline: its result and dead-letter streams' (0: none)
        self._max_deliveries = max_deliveries or {}  # per pipeline: tries of a refused write
        self._round_size = round_size
        self._child = Children()
        self._on_published = on_published  # the live page's snapshots
        self._on_dead_lettered = on_dead_lettered
        self._script = Lua(PUBLISH_THEN_ACK)
        self._record = Lua(RECORD_ONCE)
        self.published = 0
        # The latest results' latencies per pipeline, for GET /pipelines' percentiles.
        self.recent_latency_ms: dict[str, deque[int]] = {}
        self._retries: list[_Retry] = []  # refused writes, tried again when due
        self._oom_waits: dict[Frame, int] = {}  # writes refused for want of memory, per frame
        self._oom_said = -OOM_SAY_EVERY_S
        self._tries: dict[Frame, int] = {}  # refused writes so far, per frame
        self._dropped: dict[str, int] = {}  # stale drops since the last log line, per pipeline
        self._dropped_logged = 0.0

    async def run(self) -> None:
        stopped = False
        while not stopped:
            first = await self._next()
            if first is STOP:
                break
            outcomes: list[Outcome] = []
            if first is not None:
                outcomes, stopped = drain_nowait(self._in, first, self._round_size)
            outcomes += self._due()
            if outcomes:
                await self.publish(outcomes)
            self._log_drops()
        self._log_drops(at_stop=True)
        self._give_up_retries()

    async def _next(self) -> Any:
        """The next queued outcome, or None when a refused write falls due for a retry (or the
        summary of stale drops for its log line) first."""
        due = [r.due for r in self._retries]
        if self._dropped:  # the tail of a burst of drops is logged when due, not at the next drop
            due.append(asyncio.get_running_loop().time() + self._dropped_logged + DROP_LOG_EVERY_S
                       - time.monotonic())
        if not due:
            return await self._in.get()
        try:
            return self._in.get_nowait()
        except asyncio.QueueEmpty:
            pass
        wait = min(due) - asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(self._in.get(), max(0.001, wait))
        except TimeoutError:
            return None

    def _due(self) -> list[Outcome]:
        now = asyncio.get_running_loop().time()
        due = [r.outcome for r in self._retries if r.due <= now]
        self._retries = [r for r in self._retries if r.due > now]
        return due

    async def publish(self, outcomes: list[Outcome]) -> None:
        was_pending = [o.frame.pending for o in outcomes]
        try:
            replies = await self._retry.call(lambda: self._round(outcomes))
        except Stopped:  # stopping while Redis is unreachable: the frames stay pending
            _log.warning("publish_given_up_at_stop", frames=len(outcomes))
            for o in outcomes:
                self._tries.pop(o.frame, None)
                o.frame.release()
            return
        now = now_ms()
        published: dict[str, int] = {}  # per pipeline: counted once per round
        for outcome, reply, pending in zip(outcomes, replies, was_pending):
            if isinstance(reply, ResponseError):
                self._refused(outcome, reply)  # still pending: tried again, then dead-lettered
                continue
            if not reply and pending and not outcome.frame.pending and not isinstance(outcome, Acked):
                # This daemon's reclaim learnt of a trim while the round was on its way: the entry
                # left the pending list, so nothing was written. Its record is written now.
                self._retries.append(_Retry(asyncio.get_running_loop().time(), outcome))
                continue
            if self._tries:
                self._tries.pop(outcome.frame, None)
            if self._oom_waits:
                self._oom_waits.pop(outcome.frame, None)
            # 1: written and acknowledged by this round; 0: another daemon or an earlier try did
            if reply and isinstance(outcome, Published):
                name = outcome.frame.pipeline
                published[name] = published.get(name, 0) + 1
                self.seen(outcome.frame, outcome.fields, max(0, now - outcome.frame.ts_ms))
            else:
                self._account(outcome, bool(reply))
            outcome.frame.release()
        for name, count in published.items():
            self.published += count
            self._child(self._metrics.frames_published, name).inc(count)

    def seen(self, frame: Frame, fields: dict[str, Any], latency_ms: int) -> None:
        """A result was written: its latency (the metric, GET /pipelines' percentiles) and the
        live page's snapshot. Also told of the results of a pipeline's video inputs, which
        their job runs write."""
        self._child(self._metrics.e2e_latency_seconds, frame.pipeline).observe(latency_ms / 1000)
        self._recent(frame.pipeline).append(latency_ms)
        if self._on_published is not None:
            self._on_published(frame, fields)

    def dead_lettered(self, frame: Frame) -> None:
        """A frame of a pipeline's video input was dead-lettered by its job run: the page counts it."""
        if self._on_dead_lettered is not None:
            self._on_dead_lettered(frame)

    def _refused(self, o: Outcome, error: ResponseError) -> None:
        """Redis refused this outcome's write (nothing was written or acknowledged). Try again
        with back-off up to the pipeline's max_deliveries; then a result becomes a dead-letter
        entry (`publish_error`), and anything else is left pending for a later reclaim."""
        f = o.frame
        tries = self._tries.get(f, 0) + 1
        reason = str(error).split(" script: ")[0]  # Redis appends the script's SHA and line
        self._metrics.publish_failures.labels(f.pipeline).inc()
        loop = asyncio.get_running_loop()
        if out_of_memory(error):
            # Redis at maxmemory: no fault of the frame, and it passes once memory is freed.
            # The frame is held and its write tried again until then (its tries were counted
            # as for a key collision: 12 s of it dead-lettered results computed meanwhile, at
            # 5 tries), so its reader reads no more once max_in_flight frames wait. Such tries
            # count apart: a refusal of another kind after them still gets max_deliveries.
            self._metrics.redis_out_of_memory()
            waits = self._oom_waits[f] = self._oom_waits.get(f, 0) + 1
            self._retries.append(_Retry(loop.time() + min(OOM_RETRY_MAX_S, backoff_s(waits + 2)), o))
            now = time.monotonic()
            if now - self._oom_said >= OOM_SAY_EVERY_S:
                self._oom_said = now
                _log.warning("redis_out_of_memory", pipeline=f.pipeline, source=f.source, error=reason,
                             waiting=len(self._retries),
                             consequence="results wait, their frames held, until Redis has room; "
                                         "nothing is dead-lettered for it")
            return
        if tries < self._max_deliveries.get(f.pipeline, 5):
            self._tries[f] = tries
            # 0.4 s doubling (with jitter): a refusal that passes (a failover's READONLY) gets
            # seconds before the frame is given up as publish_error.
            self._retries.append(_Retry(loop.time() + backoff_s(tries + 2), o))
            if tries == 1:
                _log.warning("publish_refused_retrying", pipeline=f.pipeline, source=f.source,
                             frame_id=f.frame_id, stream=_target(o), error=reason)
            return
        self._tries.pop(f, None)
        if isinstance(o, Published):
            self._retries.append(_Retry(loop.time(), DeadLettered.of(
                f, "publish_error", f"its result could not be written to {o.stream} "
                f"({tries} tries): {reason}")))
            return
        _log.error("publish_refused_giving_up", pipeline=f.pipeline, source=f.source,
                   frame_id=f.frame_id, stream=_target(o), error=reason, tries=tries)
        f.release()  # still pending in Redis: reclaimed and tried again later

    def _give_up_retries(self) -> None:
        """At stop: frames whose writes were refused stay pending for the next daemon."""
        for r in self._retries:
            r.outcome.frame.release()
        self._retries.clear()
        self._tries.clear()
        self._oom_waits.clear()

    async def _round(self, outcomes: list[Outcome]) -> list:
        """One pipelined round for the outcomes; a reply per outcome, in order: 1 (done), 0
        (already done elsewhere) or the ResponseError of a refused write.

        Outcomes are grouped: one XACK per stream for plain acknowledgements, and one script
        call per (source, output) pair for results and dead-letter entries."""
        now = now_ms()
        acks: dict[tuple[str, str], list[int]] = {}  # (stream, group) -> outcome indexes
        writes: dict[tuple[str, str, str], list[int]] = {}  # (source, output, pipeline)
        records: list[int] = []  # outcomes of entries no longer pending: written once, not acked
        gone: list[int] = []  # nothing to write, nothing to acknowledge
        for k, o in enumerate(outcomes):
            f = o.frame
            if not f.pending:
                (gone if isinstance(o, Acked) else records).append(k)
            elif isinstance(o, Acked):
                acks.setdefault((f.stream, keys.group(f.pipeline)), []).append(k)
            else:
                writes.setdefault((f.stream, o.stream, f.pipeline), []).append(k)

        def fill(pipe: Any) -> None:
            for (stream, group), ks in acks.items():
                pipe.xack(stream, group, *(outcomes[k].frame.entry_id for k in ks))
            for (stream, output, pipeline), ks in writes.items():
                args: list[Any] = [keys.group(pipeline), self._maxlen.get(pipeline, 0),
                                   self._ttl_ms.get(pipeline, 0)]
                for k in ks:
                    pairs = self._pairs(outcomes[k], now)
                    args += [outcomes[k].frame.entry_id, len(pairs), *pairs]
                self._script.queue(pipe, [stream, output], args)
            for k in records:
                o = outcomes[k]
                assert not isinstance(o, Acked)
                f = o.frame
                marker = keys.recorded_marker(f.pipeline, f.stream, f.entry_id)
                self._record.queue(pipe, [marker, o.stream],
                                   [RECORD_TTL_MS, self._maxlen.get(f.pipeline, 0),
                                    self._ttl_ms.get(f.pipeline, 0), *self._pairs(o, now)])

        replies = iter(await run_pipelined(self._client, fill, self._script, self._record,
                                           raise_on_error=False))
        out: list[Any] = [None] * len(outcomes)
        for ks in acks.values():
            reply = next(replies)  # XACK's count: the acknowledgement is done either way
            for k in ks:
                out[k] = reply if isinstance(reply, ResponseError) else 1
        for ks in writes.values():
            reply = next(replies)
            for k, one in zip(ks, [reply] * len(ks) if isinstance(reply, ResponseError) else reply):
                out[k] = ResponseError(one.decode()) if isinstance(one, bytes) else one
        for k in records:
            out[k] = next(replies)
        for k in gone:
            out[k] = 1
        return out

    @staticmethod
    def _pairs(o: Outcome, now: int) -> list[Any]:
        f = o.frame
        if isinstance(o, Published):
            fields = dict(o.fields)
            fields["latency_ms"] = str(max(0, now - f.ts_ms))
        else:
            assert isinstance(o, DeadLettered)
            fields = deadletter_fields(f, o.reason, o.error)
        return [item for field in fields.items() for item in field]

    def _recent(self, pipeline: str) -> deque[int]:
        if (recent := self.recent_latency_ms.get(pipeline)) is None:
            recent = self.recent_latency_ms[pipeline] = deque(maxlen=RECENT)
        return recent

    def _account(self, o: Outcome, acked: bool) -> None:
        """Metrics of an outcome other than a result published by this round."""
        m, name = self._metrics, o.frame.pipeline
        if isinstance(o, Acked):
            self._child(m.frames_acked, name, o.reason).inc()
            if o.reason == "stale":
                self._note_drop(name)
        elif not acked:
            m.publish_duplicates.labels(name).inc()
        elif isinstance(o, DeadLettered):
            m.frames_dead_lettered.labels(name, o.reason).inc()
            self.dead_lettered(o.frame)
            _log.info("frame_dead_lettered", pipeline=name, source=o.frame.source,
                      frame_id=o.frame.frame_id, reason=o.reason, error=o.error)

    def _note_drop(self, pipeline: str) -> None:
        """Stale drops are logged as a summary at most every 10 s: under overload they are many."""
        self._dropped[pipeline] = self._dropped.get(pipeline, 0) + 1
        self._log_drops()

    def _log_drops(self, at_stop: bool = False) -> None:
        """The drops since the last line, once 10 s have passed since it (or at stop): every
        drop is in some line, the last of a burst too."""
        now = time.monotonic()
        if self._dropped and (at_stop or now - self._dropped_logged >= DROP_LOG_EVERY_S):
            _log.warning("stale_frames_dropped", counts=self._dropped)
            self._dropped, self._dropped_logged = {}, now


def _target(o: Outcome) -> str:
    return o.frame.stream if isinstance(o, Acked) else o.stream
