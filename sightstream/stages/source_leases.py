"""Source leases: for pipelines whose model keeps state per source (tracking), each source
stream is read by one daemon at a time, so all its frames meet the same state, in order.

A daemon holds a lease per stream in Redis (`SET NX PX`, renewed while it lives). Streams are
shared by count and by load:
- By count: a daemon takes free streams up to ceil(streams / daemons serving the pipeline),
  and gives back one surplus idle stream per round when more daemons join. A stream free for
  a whole round is taken whatever the share (a daemon that died counts until its member key
  lapses, and every live one may be at its share).
- By load: each daemon publishes the frames per second its streams give it (stream_rates.py).
  One well above the least loaded (by more than a quarter of its own load) hands that daemon
  the stream that best halves the gap, one under 0.9 x the gap (so the gap always shrinks, and
  nothing moves back and forth), unless another daemon is handing that one a stream already:
  it stops reading the stream, lets its frames in flight finish, then writes the other's name
  into the lease. The giver, and the taker once the stream is its own, hand nothing on for
  REST_ROUNDS, while the loads they publish catch up. Without this, a daemon that joins late
  (or restarts) would get only idle streams.
When a daemon dies its leases expire and the others take its streams over, with the frames it
left pending (claimed at once: the lease proves their reader gone).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from sightstream import keys, log
from sightstream.leases import HAND_OVER, KEEP, RELEASE, RENEW
from sightstream.metrics import Metrics
from sightstream.stages.flow import RedisRetry, wait_or_stop

_log = log.get(__name__)
REST_ROUNDS = 3  # rounds after a handover before another: the receiver's published load catches up
MEMBER_FORMAT = "v3"  # a member key's value: v3:<frames per second>:<its TTL, ms>
# A handover restarts the stream's tracks: only for a gap over a quarter of the giver's load,
# and over 1 frame/s (cameras sending a frame now and then are not worth a restart).
GAP_SHARE, MIN_GAP_FPS = 0.25, 1.0
MOVE_UNDER = 0.9  # a stream moves only if its rate is under this share of the gap: it shrinks
KNOWN_ROUNDS = 2  # rounds a stream is read here before it may count as idle (unread, it gives 0)


@dataclass(frozen=True)
class Member:
    """A daemon serving the pipeline, as its member key says."""

    name: str  # its consumer name: the lease token
    load: float  # the frames per second its streams give it
    takes: bool  # a stream may be handed to it: it spoke lately, and it balances as we do

    @classmethod
    def read(cls, name: str, value: str, left_ms: int) -> Member:
        """A daemon of an earlier version writes "1" or "v2:<active streams>:<ttl>": it counts
        for the share, but is handed nothing (a v1 daemon adopts a stream leased to it only
        while under its share: the stream would go unread until the lease lapsed; a v2 one
        counts streams, not frames, so the two would hand streams back and forth). A daemon
        killed a moment ago is listed until its key expires; one that has not renewed its key
        for half its TTL is handed nothing."""
        form, _, rest = value.partition(":")
        load, _, ttl = rest.partition(":")
        try:
            fps = float(load)
        except ValueError:
            fps = -1.0
        if form != MEMBER_FORMAT or not fps >= 0 or not ttl.isdigit():  # `not >=`: NaN too
            return cls(name, 0.0, False)
        return cls(name, fps, left_ms > int(ttl) // 2)


class SourceLeases:
    def __init__(self, client: Redis, pipeline: str, consumer: str, ttl_ms: int = 10_000,
                 on_lost: Callable[[], None] = lambda: None) -> None:
        self._client = client
        self._on_lost = on_lost
        self._pipeline = pipeline
        self._consumer = consumer  # the token: a restarted daemon (same name) keeps its streams
        self.ttl_ms = ttl_ms
        self.held: list[str] = []  # the streams this daemon reads
        self.lost: list[str] = []  # taken by another daemon while ours: the reader drops them
        # A stream being handed to a less loaded daemon: still leased, no longer read; handed
        # over once none of its frames is in flight here. (stream, the other's consumer name)
        self.handing: tuple[str, str] | None = None
        self._rest = 0  # rounds to wait before the next handover
        self._handed_in: dict[str, int] = {}  # streams handed to us -> rounds they stay here
        self._load = 0.0  # the frames per second this daemon last published
        self._rounds = 0  # rounds settled: in the first, leases naming this daemon are its own, kept
        self._free: set[str] = set()  # streams no daemon held at the last round
        self._taken_round: dict[str, int] = {}  # held stream -> the round it was taken in
        self._claimed: str | None = None  # the daemon this one is handing a stream to (see keys)

    async def settle(self, found: list[str], busy: Callable[[str], bool],
                     fps: Callable[[str], float]) -> list[str]:
        """One round: adopt streams handed to this daemon, take free streams up to a fair
        share, give one surplus stream back, publish this daemon's load, and hand a stream
        over when more loaded than another daemon. `busy(stream)`: frames of it are in flight
        here; `fps(stream)`: the frames per second it gave lately (0: idle). Returns the
        streams newly taken."""
        await self._publish()
        members = await self._members()
        share = math.ceil(len(found) / max(1, len(members)))
        handing = self.handing[0] if self.handing else None
        others = [s for s in found if s not in self.held and s != handing]
        taken, free = [], set()
        for stream, owner in zip(others, await self.owners(others)):
            if owner is None:
                free.add(stream)
            # Handed to us, or ours from before a restart (kept whatever the share), or free:
            # under our share, or free for a whole round (every daemon is at its share: one
            # that died still counts until its member key lapses).
            mine = owner == self._consumer
            if mine or (owner is None and (len(self.held) < share or stream in self._free)):
                if await self._client.eval(RENEW, 1, self._key(stream), self._consumer, self.ttl_ms):
                    self.held.append(stream)
                    taken.append(stream)
                    self._taken_round[stream] = self._rounds
                    if mine and self._rounds:  # handed over: not moved on soon,
                        self._handed_in[stream] = 2 * REST_ROUNDS  # and nothing handed on until
                        self._rest = max(self._rest, REST_ROUNDS)  # its load is known here
        self._free = free - set(taken)
        self._rounds += 1
        if len(self.held) > share:
            # Only an idle stream: an active one moves by load (below), or the count would undo
            # what the load did (a receiver over its count gave a busy stream back to the giver).
            # Not one just handed here: the giver is under its share now, and would take it back.
            # Read here a while: after a restart every stream gives 0 until read (a quick
            # restart gave its busy camera away, by count, in its first round).
            idle = [s for s in self.held if not busy(s) and not fps(s) and s not in self._handed_in
                    and self._rounds - self._taken_round.get(s, -KNOWN_ROUNDS) >= KNOWN_ROUNDS]
            if idle:
                await self.give_back(idle[-1])
        self._taken_round = {s: n for s, n in self._taken_round.items() if s in self.held}
        self._handed_in = {s: n - 1 for s, n in self._handed_in.items() if n > 1 and s in self.held}
        rates = {s: fps(s) for s in self.held}
        await self._publish(sum(rates.values()))
        await self._balance({m.name: m.load for m in members if m.takes and m.name != self._consumer},
                            rates, busy)
        return taken

    async def _publish(self, load: float | None = None) -> None:
        """Say this daemon serves the pipeline, the frames per second its streams give it, and
        for how long this word holds (its TTL: the others judge whether it spoke lately by it)."""
        if load is not None:
            self._load = load
        await self._client.set(keys.source_member(self._pipeline, self._consumer),
                               f"{MEMBER_FORMAT}:{self._load:.2f}:{self.ttl_ms}", px=self.ttl_ms)

    async def _balance(self, others: dict[str, float], rates: dict[str, float],
                       busy: Callable[[str], bool]) -> None:
        """Hand a stream to the least loaded of the `others` (their frames per second), or
        finish a handover once the stream's frames here are done. `rates`: this daemon's
        streams' frames per second."""
        if self.handing is not None:
            stream, to = self.handing
            if to not in others:  # it stopped speaking meanwhile (stopped, died): read it again here
                self.handing = None
                self.held.append(stream)
                await self._unclaim()
                _log.info("source_handover_dropped", pipeline=self._pipeline, source=stream, to=to)
            elif not busy(stream):
                self.handing = None
                self._rest = REST_ROUNDS
                if await self._client.eval(HAND_OVER, 1, self._key(stream), self._consumer, to, self.ttl_ms):
                    _log.info("source_handed_over", pipeline=self._pipeline, source=stream, to=to)
            return
        if self._rest:  # the others' published loads catch up with the last handover first
            self._rest -= 1
            if not self._rest:  # the taker's load shows the stream now: others may hand it one
                await self._unclaim()
            return
        if not others:
            return
        to, least = min(others.items(), key=lambda item: item[1])
        load = sum(rates.values())
        gap = load - least
        if gap <= max(MIN_GAP_FPS, GAP_SHARE * load):
            return
        # Not one just handed here (its tracks would restart twice). Under 0.9 x the gap: the
        # new gap, |gap - 2 x rate|, is then under 0.8 x this one, so a stream never bounces.
        movable = {s: r for s, r in rates.items() if 0 < r < MOVE_UNDER * gap and s not in self._handed_in}
        if not movable:
            return
        # One giver at a time per taker: two that saw it idle handed it a stream each at once,
        # and it handed one on once its load showed.
        if not await self._client.set(keys.source_incoming(self._pipeline, to), self._consumer,
                                      nx=True, px=self.ttl_ms):  # lapses if this daemon dies
            return
        self._claimed = to
        stream = min(movable, key=lambda s: abs(movable[s] - gap / 2))
        self.held.remove(stream)
        self.handing = (stream, to)
        _log.info("source_handing_over", pipeline=self._pipeline, source=stream, to=to,
                  fps_here=round(load, 2), fps_there=round(least, 2), fps_of_source=round(rates[stream], 2))

    async def _unclaim(self) -> None:
        if self._claimed is not None:
            await self._client.eval(RELEASE, 1, keys.source_incoming(self._pipeline, self._claimed),
                                    self._consumer)
            self._claimed = None

    async def _members(self) -> list[Member]:
        """The daemons serving the pipeline, this one included."""
        prefix = keys.source_member(self._pipeline, "")
        names = [key.decode() async for key in
                 self._client.scan_iter(match=keys.source_member(self._pipeline, "*"), count=1000)]
        if not names:
            return []
        async with self._client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.get(name)
                pipe.pttl(name)
            replies = await pipe.execute()
        members = []
        for name, value, left_ms in zip(names, replies[::2], replies[1::2]):
            if value is not None:  # else gone between the scan and the read
                members.append(Member.read(name[len(prefix):], value.decode(), left_ms))
        return members

    async def owners(self, streams: list[str]) -> list[str | None]:
        """Who holds each stream's lease, in one round trip (a pipeline: on a cluster, the
        keys are in several slots, which one MGET cannot read)."""
        if not streams:
            return []
        async with self._client.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.get(self._key(stream))
            values = await pipe.execute()
        return [v.decode() if v is not None else None for v in values]

    async def give_back(self, stream: str) -> None:
        self.held.remove(stream)
        await self._client.eval(RELEASE, 1, self._key(stream), self._consumer)
        _log.info("source_released", pipeline=self._pipeline, source=stream)

    async def keep(self, stop: asyncio.Event, metrics: Metrics) -> None:
        """Renew the held leases, and the one being handed over, until stopped (in its own
        task: a slow model call must not let them lapse). A lease found taken goes to `lost`.
        The daemon releases them once drained. Redis errors are counted and logged
        (`source_lease`); the next round retries, and a lease that lapsed meanwhile is found then."""
        retry = RedisRetry("source_lease", metrics, stop, pipeline=self._pipeline)
        while not stop.is_set():
            if await wait_or_stop(stop, self.ttl_ms / 3000):
                return
            try:
                for stream in list(self.held):
                    if not await self._client.eval(RENEW, 1, self._key(stream), self._consumer, self.ttl_ms):
                        self.held.remove(stream)
                        self.lost.append(stream)
                        self._on_lost()
                        _log.warning("source_lease_lost", pipeline=self._pipeline, source=stream)
                handing = self.handing
                if handing and not await self._client.eval(KEEP, 1, self._key(handing[0]), self._consumer,
                                                           self.ttl_ms):
                    if self.handing == handing:  # not handed over meanwhile: lapsed, someone took it
                        self.handing = None
                        self._on_lost()
                        _log.warning("source_lease_lost", pipeline=self._pipeline, source=handing[0])
                retry.succeeded()
            except (RedisError, OSError) as e:
                retry.note(e)

    async def release_all(self) -> None:
        try:
            for stream in list(self.held):
                await self.give_back(stream)
            if self.handing:
                await self._client.eval(RELEASE, 1, self._key(self.handing[0]), self._consumer)
                self.handing = None
            await self._unclaim()
            await self._client.delete(keys.source_member(self._pipeline, self._consumer))
        except (RedisError, OSError):
            pass  # they expire

    def _key(self, stream: str) -> str:
        return keys.source_lease(self._pipeline, stream)
