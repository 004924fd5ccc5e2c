"""Redis ingest: one pipeline's consumer-group reader over every stream its input matches.

- Groups are created at ID 0 (BUSYGROUP ignored; MKSTREAM only for streams the config names,
  so a deleted stream found by a glob is never made again) and re-created on NOGROUP
  (a Redis restarted without persistence has lost them).
- On start it drains its own pending entries (ID 0: left by a previous run under this stable
  consumer name) before reading new ones (`>`).
- It reads only as many entries as the pipeline has in-flight room for: backlog stays in Redis.
- Streams that gave entries within the last second are read on their own, room // n entries
  each (in turn, when more are active than there is room for), waiting up to 10 ms; the others
  are looked at in turn between those reads, `room` streams at a time, without blocking. So a
  busy camera keeps its pace however many idle ones the input glob matches. Only when no
  stream is active and one read covers them all does the read block (up to 1 s).
- Live mode: entries already stale when read, or that would be by the time they reach the
  device (stages/queue_wait.py), are dropped at once (stages/pending.py); a stream whose read
  gave only such entries is read again, on its own, before the others' turn.
- New streams matching an input glob are found by a periodic SCAN (every `discover_s`).
- For a model that keeps state per source (tracking), it reads only the streams whose source
  lease it holds (stages/source_leases.py), and takes over a stream's pending entries when it
  takes the stream.
- On Redis Cluster, a read cannot span slots: the streams of a round are read with one
  XREADGROUP per slot, sent in one pipeline (a round trip per node), and polled (5 ms, growing
  to 50 ms while idle) rather than blocked on. A stream whose results or dead-letters would
  land in another slot (no `{hash tag}`, or an output template without `{source}`) is not
  read: the publish script must touch both in one call. It is logged once.
"""

from __future__ import annotations

import time
from typing import Any

from redis.asyncio import Redis
from redis.crc import key_slot

from sightstream import keys, log
from sightstream.frames import entry_ms
from sightstream.redis_conn import BLOCK_MS, PartialOutage, run_pipelined, same_slot
from sightstream.stages.pending import StreamReader, delivery_counts
from sightstream.stages.source_leases import SourceLeases
from sightstream.stages.stream_rates import StreamRates

_log = log.get(__name__)
GLOB_CHARS = set("*?[")
ACTIVE_S = 1.0  # a stream that gave entries this recently is read with the active ones
# Live mode: reads in a row of streams behind, at most, before the others' turn (a camera whose
# clock runs behind would otherwise delay them each time it sends)
MAX_STALE_REPEATS = 100
ACTIVE_BLOCK_MS = 10  # how long a read of the active streams waits, when others wait their turn
TAKEOVER_PAGE = 1000


def _first_time(seen: set, key: Any) -> bool:
    """True the first time `key` is seen: a problem logged once per key, in bounded memory."""
    if key in seen:
        return False
    if len(seen) > 10_000:
        seen.clear()
    seen.add(key)
    return True


class RedisIngest(StreamReader):
    def __init__(self, *args: Any, reader: Redis, exclude_globs: list[str], discover_s: float = 2.0,
                 leases: SourceLeases | None = None, cluster: bool = False, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._cluster = cluster
        self._refused: set[str] = set()  # cluster: streams whose outputs are in another slot
        self._unnamed: set[bytes] = set()  # keys whose name is not UTF-8: never read, logged once
        self._named = {s for s in self._p.streams if not GLOB_CHARS & set(s)}  # made if missing
        self.leases = leases
        self._reader = reader  # a client for blocking reads (its socket timeout exceeds BLOCK)
        self._exclude = exclude_globs
        self._discover_s = discover_s
        self.streams: list[str] = []  # every stream this daemon reads for the pipeline
        # Every stream the pipeline's group covers, at the latest discovery: the same as
        # `streams`, but for a per-source model, whose sources are spread over the daemons.
        self.found: list[str] = []
        self._draining: dict[str, str] = {}  # stream -> next own pending ID still to re-read
        self._leases_given_up = False  # paused: its source leases and member key let go
        self._rotation = 0
        self._active: dict[str, float] = {}  # stream -> when it last gave entries (monotonic)
        self.rates = StreamRates()  # per-source leases balance by them
        self._active_rotation = 0
        self._stale_repeats = 0  # reads in a row of streams behind, for their stale entries
        self._behind: list[str] = []  # live mode: streams whose last read gave stale entries only
        self._probe_next = False  # the next read looks at idle streams (alternates with the active)
        self._idle_rounds = 0  # reads of idle streams in this pass that found nothing
        self._idle_passes = 0  # passes over every stream in a row that found nothing
        self._next_discovery = 0.0
        self._joined: set[str] = set()

    async def step(self) -> None:
        if self.leases and self.leases.lost:
            self._drop(self.leases.lost)
            self.leases.lost.clear()
        if time.monotonic() >= self._next_discovery:
            await self.discover()
        if self._in_flight.paused:
            await self._in_flight.until_going(min(self._discover_s, 0.5))  # stopping: within that
            return
        if not self.streams:
            await self.sleep(min(self._discover_s, 0.5))
            return
        room = await self._in_flight.take(self._p.max_in_flight)
        used = 0
        try:
            used = await (self._drain_own(room) if self._draining else self._read_new(room))
        finally:
            self._in_flight.give(room - used)

    async def discover(self) -> None:
        """Find the streams matching the inputs and join their groups."""
        await self._group_start()  # skip_history: from now, whenever its streams are found
        found: list[str] = []
        for pattern in self._p.streams:
            if GLOB_CHARS & set(pattern):
                async for key in self._client.scan_iter(match=pattern, count=1000, _type="stream"):
                    try:
                        name = key.decode()
                    except UnicodeDecodeError:  # its results could not be named: never read
                        if _first_time(self._unnamed, key):
                            _log.warning("stream_name_not_utf8", pipeline=self._p.name, key=repr(key))
                        continue
                    if not keys.is_own_output(name, self._exclude):
                        found.append(name)
            else:
                found.append(pattern)
        found = list(dict.fromkeys(found))
        if self._cluster:
            found = [s for s in found if self._one_slot(s)]
        unjoined = [s for s in found if s not in self._joined]
        if unjoined:
            _, gone = await self.ensure_groups(unjoined, self._named)
            if gone:  # deleted since the scan
                found = [s for s in found if s not in gone]
            self._joined.update(s for s in unjoined if s not in gone)
        self.found = found
        if self.leases is None:
            new = [s for s in found if s not in self.streams]
        elif self._in_flight.paused:
            # Its model cannot serve them (or is loading): its sources go to daemons whose model
            # can, with the frames it held (the lease released proves their reader gone). Kept,
            # they drew busy streams from peers (its published load was 0) and were read by none.
            new = []
            if self.leases.held or not self._leases_given_up:
                await self.leases.release_all()
                self._drop(list(self.streams))
                self._leases_given_up = True
        else:
            self._leases_given_up = False
            await self.leases.settle(found, self._busy, self._fps)
            # Held and not read yet: taken now, or taken before and its take-over failed (a
            # NOGROUP, Redis down); from settle's return it would be taken once and then never read.
            new = [s for s in self.leases.held if s not in self.streams and s in found]
            for stream in new:
                await self._take_over(stream)
            self._drop([s for s in self.streams if s not in self.leases.held])
        if new:
            self.streams.extend(new)
            self._draining.update({s: "0" for s in new})
            _log.info("streams_joined", pipeline=self._p.name, streams=new)
        self._metrics.sources.labels(self._p.name).set(len(self.streams))
        self._next_discovery = time.monotonic() + self._discover_s

    def _one_slot(self, stream: str) -> bool:
        """Cluster: the stream, its results and dead-letters share a slot (else not read)."""
        p = self._p
        outputs = keys.result_stream(p.output, p.name, stream), keys.deadletter_stream(p.name, stream)
        if same_slot(stream, *outputs):
            return True
        if _first_time(self._refused, stream):
            _log.warning("stream_not_read_on_cluster", pipeline=p.name, stream=stream,
                         reason="its results would be in another slot: give the key a hash tag, "
                         "e.g. frames:{cam1}, and keep {source} in the output template")
        return False

    def read_own_again(self) -> None:
        """Re-read this consumer's pending entries first, in order, as at a start: frames let go
        (the pipeline paused for its model) are processed now, before newer ones, not once idle
        enough for the reclaimer (30 s), and a tracker sees them in order."""
        self._draining = {s: "0" for s in self.streams}

    def _drop(self, streams: list[str]) -> None:
        for stream in streams:
            if stream in self.streams:
                self.streams.remove(stream)
            self._draining.pop(stream, None)
            self._active.pop(stream, None)
            self.rates.drop(stream)
            self._joined.discard(stream)  # found again (a deleted stream written to): its group is made again

    def _busy(self, stream: str) -> bool:
        return any(f.stream == stream for f in self._in_flight.frames())

    def _fps(self, stream: str) -> float:
        """The frames per second the stream gives the model: what it sends, or the pipeline's
        `fps` if lower (the sampler keeps no more)."""
        rate = self.rates.fps(stream)
        return min(rate, self._p.fps) if self._p.fps else rate

    async def _take_over(self, stream: str) -> None:
        """A stream just leased: its pending entries are ours now (their reader is gone), to be
        re-read first and in order. XCLAIM JUSTID leaves their delivery counts as they were."""
        generations = self._admission.generations
        generations[stream] = generations.get(stream, 0) + 1
        start = "-"
        while True:
            rows: Any = await self._client.xpending_range(stream, self._group, start, "+", TAKEOVER_PAGE)
            theirs = [r["message_id"] for r in rows if r["consumer"].decode() != self._consumer]
            if theirs:
                await self._client.xclaim(stream, self._group, self._consumer, 0, theirs, justid=True)
                _log.info("source_taken_over", pipeline=self._p.name, source=stream, pending=len(theirs))
            if len(rows) < TAKEOVER_PAGE:
                return
            start = "(" + rows[-1]["message_id"].decode()

    async def on_nogroup(self) -> None:
        """A group is gone: the stream was deleted (a camera retired), or Redis lost it
        (restarted without persistence). Streams that no longer exist are dropped, not made
        again (MKSTREAM would keep a retired camera's stream, and its reading, for ever), unless
        the config names them; discovery finds them again once a producer writes to them.

        Which it was is asked in one round trip (EXISTS of each stream): only when none is gone
        are the groups made again, every stream's. Each retired camera made every group of the
        pipeline again, one call per stream, and again at the next discovery: 2,000 calls per
        camera with 1,000 streams, and a live camera's results a second late meanwhile."""
        streams = list(self.streams)

        def fill(pipe: Any) -> None:
            for stream in streams:
                pipe.exists(stream)

        exist = await run_pipelined(self._client, fill)
        gone = [s for s, n in zip(streams, exist) if not n and s not in self._named]
        created: list[str] = []
        if not gone:  # on streams that exist (or named ones deleted): Redis lost its data
            self._joined.clear()
            created, gone = await self.ensure_groups(streams, self._named)
        if created:
            _log.warning("group_missing_recreated", pipeline=self._p.name, streams=len(created))
        if gone:
            _log.info("deleted_streams_dropped", pipeline=self._p.name, count=len(gone), streams=gone[:20])
            self._drop(gone)
            if self.leases is not None:  # held, it would never count as new again: nobody would read it
                for stream in gone:
                    if stream in self.leases.held:
                        await self.leases.give_back(stream)
        for stream in created:
            self._draining.pop(stream, None)  # a new group has no pending entries

    async def _drain_own(self, room: int) -> int:
        """Re-read this consumer's own pending entries, with their delivery counts."""
        stream, cursor = next(iter(self._draining.items()))
        reply: Any = await self._client.xreadgroup(
            self._group, self._consumer, {stream: cursor}, count=room
        )
        entries = reply[0][1] if reply else []
        if not entries:
            del self._draining[stream]
            return 0
        self._draining[stream] = entries[-1][0].decode()
        counts = await delivery_counts(self._client, stream, self._group, self._consumer,
                                       entries[0][0].decode(), entries[-1][0].decode(), len(entries))
        # The re-read counts as a delivery in Redis (6.2 and 7), so a frame that crashes the
        # daemon at every restart reaches max_deliveries instead of crash-looping forever.
        # A pending entry whose content was deleted comes back with no fields: dead-lettered.
        return await self._admission.admit(stream, entries, counts)

    def _choose(self, room: int) -> tuple[list[str], int | None, bool]:
        """The streams of the next read, how long it may block (ms; None: it does not), and
        whether they are the active ones. XREADGROUP's COUNT is per stream, so a read covers
        at most `room` streams, room // n entries each: reading idle streams beside a busy one
        would leave it one entry per read, and a blocking read over idle ones only would stall
        it for a second. So active streams (entries within ACTIVE_S) are read on their own, in
        turn when more than `room` are active, and reads of the others, in turn, come between."""
        now = time.monotonic()
        for stream, last in list(self._active.items()):  # _drop takes dropped streams out too
            if now - last > ACTIVE_S:
                del self._active[stream]
        behind = [s for s in self._behind if s in self._active][:room]
        if behind:
            if self._stale_repeats < MAX_STALE_REPEATS:
                return behind, ACTIVE_BLOCK_MS, True  # they skip to their live frames first
            self._stale_repeats = 0  # the others' turn, then theirs again
        active = list(self._active)
        idle_exist = len(active) < len(self.streams)
        if active and not (self._probe_next and idle_exist):
            self._probe_next = idle_exist
            start = self._active_rotation % len(active)
            self._active_rotation += room
            chosen = (active[start:] + active[:start])[:room]
            # A long wait only when the read covers every stream: else others wait their turn.
            return chosen, (BLOCK_MS if len(chosen) == len(self.streams) else ACTIVE_BLOCK_MS), True
        self._probe_next = False
        idle = [s for s in self.streams if s not in self._active] or self.streams
        n = min(room, len(idle))
        start = self._rotation % len(idle)
        chosen = (idle[start:] + idle[:start])[:n]
        self._rotation += n
        # Blocks only when one read looks at every stream and none is active.
        return chosen, (BLOCK_MS if not active and n == len(self.streams) else None), False

    async def _read_new(self, room: int) -> int:
        chosen, block_ms, of_active = self._choose(room)
        count = room // len(chosen)
        if self._cluster:
            replies: Any = await self._read_by_slot(chosen, count)
        else:
            # redis-py types replies loosely: at run time, a list of (stream, [(id, fields)]).
            replies = await self._reader.xreadgroup(
                self._group, self._consumer, {s: ">" for s in chosen}, count=count, block=block_ms)
        used = 0
        now = time.monotonic()
        behind = []
        for stream, entries in replies or ():
            name = stream.decode()
            if entries:
                self._active[name] = now
            admitted, dropped, aged = await self._admission.admit_read(name, entries)
            if self.leases and admitted > dropped:  # stale ones cost the model nothing
                sent = entry_ms(entries[0][0].decode()), entry_ms(entries[-1][0].decode())
                self.rates.add(name, admitted - dropped, *sent)
            if admitted and admitted == aged:  # all too old: behind (past its share is not)
                behind.append(name)
            used += admitted
        # Live mode: a stream whose read gave stale entries only is read again, on its own,
        # before the others' turn. Else a camera left behind moves on a few entries per turn
        # while the others' fresh frames take theirs: every frame it reads is stale, for ever
        # (judged over the whole read, a camera beside it with fresh frames kept it behind).
        self._stale_repeats = self._stale_repeats + 1 if behind and of_active else 0
        self._behind = behind if of_active else []
        if used or (block_ms and not self._cluster):
            self._idle_rounds = self._idle_passes = 0
        elif not self._active:
            # Nothing anywhere: a pause once each stream has been looked at, growing from 5 to
            # 50 ms, not a busy loop (on a cluster, where no read blocks, the same).
            self._idle_rounds += 1
            if self._idle_rounds * room >= len(self.streams):
                self._idle_rounds, self._idle_passes = 0, self._idle_passes + 1
                await self.sleep(min(0.05, 0.005 * self._idle_passes))
        elif self._cluster and of_active:
            await self.sleep(ACTIVE_BLOCK_MS / 1000)  # active streams with nothing new: a short poll
        return used

    async def _read_by_slot(self, streams: list[str], count: int) -> list:
        """Cluster: one XREADGROUP per slot, in one pipeline; polled, since one blocking read
        cannot cover several slots."""
        by_slot: dict[int, list[str]] = {}
        for stream in streams:
            by_slot.setdefault(key_slot(stream.encode()), []).append(stream)
        outage: PartialOutage | None = None
        async with self._client.pipeline(transaction=False) as pipe:
            for group in by_slot.values():
                pipe.xreadgroup(self._group, self._consumer, {s: ">" for s in group}, count=count)
            try:
                replies: Any = await pipe.execute(raise_on_error=False)
            except PartialOutage as e:  # a node is down: the others' entries are ours all the same
                outage, replies = e, e.replies
        entries = [pair for reply in replies if not isinstance(reply, Exception) for pair in reply or ()]
        if errors := [r for r in replies if isinstance(r, Exception)]:
            # Entries the other slots returned are already pending here: admitted before the
            # error (NOGROUP, a node down) is raised.
            for stream, got in entries:
                await self._admission.admit(stream.decode(), got)
            raise outage or errors[0]
        return entries
