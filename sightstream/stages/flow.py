"""What every stage shares: the STOP sentinel, the in-flight registry, queue helpers, and the
one way Redis calls are retried through an outage (`RedisRetry`)."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sightstream import log
from sightstream.frames import Frame
from sightstream.metrics import Metrics
from sightstream.redis_conn import out_of_memory

T = TypeVar("T")
_log = log.get(__name__)


class _Stop:
    def __repr__(self) -> str:
        return "STOP"


STOP: Final = _Stop()


class InFlight:
    """The frames a pipeline holds, from read to acknowledgement, bounded by `capacity`.

    Readers reserve room before they read (so they read only what there is room for: backlog
    waits in Redis, never here), then `hold` each frame they queue; a frame's `release()`
    (called once it is acknowledged, or abandoned to be retried) frees its place. The registry
    also tells the heartbeat which entries this daemon is still working on."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free = capacity
        self._room = asyncio.Event()
        self._room.set()
        self._waiting = 0  # readers waiting for room
        self._frames: dict[tuple[str, str], Frame] = {}
        self._paused: str | None = None
        self._going = asyncio.Event()
        self._going.set()
        self.loading = False  # paused only while its model loads at start (no failure yet)

    @property
    def paused(self) -> str | None:
        """Why the pipeline reads nothing now (its model loads, or cannot be loaded), or None.
        Its readers look before each read: frames wait in Redis, pending or unread."""
        return self._paused

    @paused.setter
    def paused(self, why: str | None) -> None:
        self._paused = why
        if why is None:
            self._going.set()
        else:
            self._going.clear()

    async def until_going(self, seconds: float) -> None:
        """Wait until the pipeline goes on, at most `seconds` (a reader then looks again):
        it reads at once when its model has loaded, not at its next look."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._going.wait(), seconds)

    async def take(self, most: int) -> int:
        """Reserve room for up to `most` frames, waiting until there is room for one. A reader
        that finds another waiting lets it go first: the stream reader gives its room back
        after each blocking read and took it again at once, so the reclaimer, waiting, never got
        any while the streams were quiet (a dead daemon's last frames waited for the next one)."""
        if self._waiting:
            await asyncio.sleep(0)  # the waiter, woken by the room given back, runs first
        while self._free <= 0:
            self._room.clear()
            self._waiting += 1
            try:
                await self._room.wait()
            finally:
                self._waiting -= 1
        n = min(most, self._free)
        self._free -= n
        return n

    def give(self, n: int = 1) -> None:
        """Return reserved room that was not used."""
        self._free += n
        self._room.set()

    def hold(self, frame: Frame) -> bool:
        """Track a frame in one reserved place; its release() gives the place back once.
        False (and nothing held) when this entry is already in flight here: skip the copy."""
        key = (frame.stream, frame.entry_id)
        if key in self._frames:
            return False
        self._frames[key] = frame
        frame.release = _Release(self, key)
        return True

    def _release(self, key: tuple[str, str]) -> None:
        if self._frames.pop(key, None) is not None:
            self.give()

    def waiting(self) -> Counter[str]:
        """Frames held that no device has taken yet and that have no outcome yet (read, sampled,
        decoded, batched), by stream."""
        return Counter(stream for (stream, _), frame in self._frames.items()
                       if not frame.at_device and not frame.settled)

    def holds(self, stream: str, entry_id: str) -> bool:
        return (stream, entry_id) in self._frames

    def held(self, stream: str, entry_id: str) -> Frame | None:
        return self._frames.get((stream, entry_id))

    def frames(self) -> list[Frame]:
        return list(self._frames.values())

    @property
    def in_flight(self) -> int:
        """Frames held now (room reserved for a read in progress is not a frame)."""
        return len(self._frames)


class _Release:
    __slots__ = ("_in_flight", "_key")

    def __init__(self, in_flight: InFlight, key: tuple[str, str]) -> None:
        self._in_flight: InFlight | None = in_flight
        self._key = key

    def __call__(self) -> None:
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            in_flight._release(self._key)


def drain_nowait(queue: asyncio.Queue, first: Any, most: int) -> tuple[list[Any], bool]:
    """`first` plus whatever is already queued, up to `most` items. Returns (items, stopped):
    a STOP met on the way ends the list and is reported, not returned."""
    items = [first]
    while len(items) < most:
        try:
            item = queue.get_nowait()
        except asyncio.QueueEmpty:
            break
        if item is STOP:
            return items, True
        items.append(item)
    return items, False


def backoff_s(failures: int, cap: float = 5.0) -> float:
    """Exponential back-off with jitter: 0.1 s doubling per failure up to `cap`, times 0.5-1,
    so daemons that lost Redis together do not come back in step."""
    return min(cap, 0.1 * 2 ** min(failures, 6)) * random.uniform(0.5, 1.0)


async def wait_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep `seconds`, or less if `stop` is set meanwhile (a back-off must not hold up a
    shutdown). True: stopped."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True


def worth_logging(failures: int) -> bool:
    """Log the first failure of a run and every 30th after it: no log flood while Redis is down."""
    return failures == 1 or failures % 30 == 0


class Stopped(Exception):
    """The daemon stopped while a Redis call waited to be retried: the caller hands back what it
    holds (left pending in Redis, for this daemon's successor or another daemon)."""


class RedisRetry:
    """Retries one kind of Redis call (`op`) through an outage, the same way everywhere:
    jittered back-off (`backoff_s`) that wakes at once when `stop` is set, every failure counted
    in `sightstream_redis_errors_total{op}`, every recovery in
    `sightstream_redis_reconnects_total{op}`, a log line (`redis_unreachable` or
    `redis_error`, with `op`) on the first failure and every 30th, and `redis_recovered` when a
    call succeeds again. Once the daemon is stopping, a failed call is not retried: `Stopped`
    is raised instead, and every later call raises it at once without trying Redis (each try
    could wait out a connect timeout), so an outage never holds up a shutdown."""

    def __init__(self, op: str, metrics: Metrics, stop: asyncio.Event, **log_fields: Any) -> None:
        self.op = op
        self.failures = 0
        self.gave_up = False  # stopped during an outage: Redis is not tried again
        self._metrics = metrics
        self._stop = stop
        self._log_fields = log_fields

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """`await fn()` until it succeeds; raises Stopped if the daemon stops first."""
        while True:
            if self.gave_up:
                raise Stopped(self.op)
            try:
                result = await fn()
            except (RedisError, OSError) as e:
                await self.failed(e)
                continue
            self.succeeded()
            return result

    async def failed(self, error: BaseException) -> None:
        """Count and log a failure, then back off; raises Stopped if the daemon stops."""
        self.note(error)
        if await wait_or_stop(self._stop, backoff_s(self.failures)):
            self.gave_up = True
            raise Stopped(self.op)

    def note(self, error: BaseException) -> None:
        """Count and log a failure (for loops with a cadence of their own, which do not back off)."""
        self.failures += 1
        self._metrics.redis_errors.labels(self.op).inc()
        if out_of_memory(error):  # a sampling claim, a group to make, a lease: readiness says so
            self._metrics.redis_out_of_memory()
        if worth_logging(self.failures):
            unreachable = isinstance(error, (RedisConnectionError, RedisTimeoutError, OSError))
            _log.warning("redis_unreachable" if unreachable else "redis_error", op=self.op,
                         error=str(error) or type(error).__name__, failures=self.failures,
                         **self._log_fields)

    def succeeded(self) -> None:
        if self.failures:
            _log.info("redis_recovered", op=self.op, after_failures=self.failures, **self._log_fields)
            self._metrics.redis_reconnects.labels(self.op).inc()
        self.failures = 0
