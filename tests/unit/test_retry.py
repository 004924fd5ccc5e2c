"""RedisRetry: the one way Redis calls are retried through an outage, and how each stage that
waits on Redis gives its frames back when the daemon stops during an outage."""

from __future__ import annotations

import asyncio
import json

import fakeredis
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from structlog.testing import capture_logs

from sightstream.config import PipelineSettings
from sightstream.frames import Frame, Published
from sightstream.metrics import Metrics
from sightstream.stages.flow import STOP, InFlight, RedisRetry, Stopped
from sightstream.stages.pending import Admission
from sightstream.stages.publisher import Publisher
from sightstream.stages.sampler import Sampler
from tests.conftest import wait_for


def counted(metrics: Metrics, name: str) -> dict[str, float]:
    return {s.labels["op"]: s.value for m in metrics.registry.collect() if m.name == name
            for s in m.samples if s.name.endswith("_total")}


async def test_retries_until_redis_answers_counting_each_failure_and_the_recovery():
    metrics, calls = Metrics(), []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise RedisConnectionError("Connection refused")
        return "ok"

    with capture_logs() as logs:
        assert await RedisRetry("publish", metrics, asyncio.Event()).call(flaky) == "ok"
    assert len(calls) == 3
    assert counted(metrics, "sightstream_redis_errors") == {"publish": 2}
    assert counted(metrics, "sightstream_redis_reconnects") == {"publish": 1}
    events = [(e["event"], e.get("op")) for e in logs]
    assert events == [("redis_unreachable", "publish"), ("redis_recovered", "publish")]


async def test_a_stop_during_the_back_off_ends_the_wait_at_once():
    stop = asyncio.Event()
    retry = RedisRetry("sample", Metrics(), stop)

    async def down() -> None:
        raise RedisConnectionError("Connection refused")

    task = asyncio.create_task(retry.call(down))
    while retry.failures < 4:  # back-off grows past a second by the 4th failure
        await asyncio.sleep(0.01)
    stop.set()
    with pytest.raises(Stopped):
        await asyncio.wait_for(task, 0.5)  # far less than the back-off it was in


async def test_once_stopping_a_failed_call_is_not_retried():
    stop = asyncio.Event()
    stop.set()
    calls = []

    async def down() -> None:
        calls.append(1)
        raise RedisConnectionError("Connection refused")

    retry = RedisRetry("publish", Metrics(), stop)
    with pytest.raises(Stopped):
        await retry.call(down)
    assert len(calls) == 1
    with pytest.raises(Stopped):  # and once given up, Redis is not tried again
        await retry.call(down)
    assert len(calls) == 1


class Unreachable(fakeredis.FakeAsyncRedis):
    """A client whose every round trip fails as if Redis were down."""

    def pipeline(self, *args, **kwargs):
        raise RedisConnectionError("Connection refused")

    async def evalsha(self, *args, **kwargs):
        raise RedisConnectionError("Connection refused")


def held_frames(n: int) -> tuple[InFlight, list[Frame]]:
    in_flight = InFlight(n)
    frames = [Frame("p", "frames:{a}", f"{i}-0", {}, i * 10) for i in range(1, n + 1)]
    for f in frames:
        in_flight.hold(f)
    return in_flight, frames


async def test_the_publisher_hands_its_frames_back_when_stopped_during_an_outage():
    stop = asyncio.Event()
    in_flight, frames = held_frames(3)
    inq: asyncio.Queue = asyncio.Queue()
    pub = Publisher(Unreachable(), inq, Metrics(), {"p": 100}, stop=stop)
    for f in frames:
        inq.put_nowait(Published(f, "results:p:frames:{a}", {"frame_id": f.frame_id}))
    task = asyncio.create_task(pub.run())
    await wait_for(lambda: pub._retry.failures >= 2, 5, "the publisher retrying")
    assert in_flight.in_flight == 3 and not task.done()
    stop.set()
    await inq.put(STOP)
    await asyncio.wait_for(task, 1.0)
    assert in_flight.in_flight == 0  # released: still pending in Redis for another daemon
    assert pub.published == 0


async def test_the_sampler_hands_its_frames_back_when_stopped_during_an_outage():
    stop = asyncio.Event()
    in_flight, frames = held_frames(2)
    inq, out, outcomes = asyncio.Queue(), asyncio.Queue(), asyncio.Queue()
    sampler = Sampler(5.0, Unreachable(), inq, out, outcomes, Metrics(), stop)
    for f in frames:
        inq.put_nowait(f)
    task = asyncio.create_task(sampler.run())
    await wait_for(lambda: sampler._retry.failures >= 2, 5, "the sampler retrying")
    assert in_flight.in_flight == 2 and not task.done()
    stop.set()
    await inq.put(STOP)
    await asyncio.wait_for(task, 1.0)
    assert in_flight.in_flight == 0
    assert out.get_nowait() is STOP and outcomes.empty()  # nothing decided, nothing passed on


async def test_a_chained_pipeline_hands_its_frames_back_when_stopped_during_an_outage():
    stop = asyncio.Event()
    in_flight, read_q, outcomes = InFlight(4), asyncio.Queue(), asyncio.Queue()
    chain = PipelineSettings(name="masks", prompt_from="faces")
    admission = Admission(chain, in_flight, read_q, outcomes, Metrics(), Unreachable(), stop)
    upstream = {b"source": b"frames:{a}", b"frame_id": b"1-0", b"ts": b"1",
                b"result": json.dumps({"detections": []}).encode()}
    room = await in_flight.take(2)
    task = asyncio.create_task(admission.admit("results:faces:frames:{a}",
                                               [(b"5-0", upstream), (b"6-0", upstream)]))
    await wait_for(lambda: admission._fetch_retry.failures >= 2, 5, "the fetch retrying")
    assert in_flight.in_flight == 2
    stop.set()
    used = await asyncio.wait_for(task, 1.0)
    in_flight.give(room - used)
    assert in_flight.in_flight == 0 and in_flight._free == 4  # every place given back
    assert read_q.empty() and outcomes.empty()  # nothing passed on: both stay pending in Redis


@pytest.mark.parametrize("url,shown", [
    ("redis://:s3cret@redis.internal:6380/0", "redis://:***@redis.internal:6380/0"),
    ("redis://app:s3cret@redis.internal/0", "redis://app:***@redis.internal/0"),  # no port: none added
    ("redis://app:s3cret@[::1]:6379", "redis://app:***@[::1]:6379"),  # IPv6 brackets kept
    ("redis://redis.internal:6379/0?password=s3cret&socket_timeout=5",
     "redis://redis.internal:6379/0?password=***&socket_timeout=5"),
    ("rediss://app@redis.internal:6379", "rediss://app@redis.internal:6379"),  # a user alone is no secret
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("unix:///tmp/redis.sock?db=0", "unix:///tmp/redis.sock?db=0"),  # nothing to mask: unchanged
    ("rediss://h:6380/0?ssl_ca_certs=/etc/ca.pem&Password=x", "rediss://h:6380/0?ssl_ca_certs=/etc/ca.pem&Password=***"),
    ("rtsp://admin:hunter2@cam.local:554/stream1", "rtsp://admin:***@cam.local:554/stream1"),  # a camera's URL
])
def test_a_redis_url_is_shown_without_its_password(url, shown):
    from sightstream.redis_conn import safe_url

    assert safe_url(url) == shown


async def test_a_reader_stopped_during_an_outage_does_not_say_redis_recovered():
    """Its step returns for the stop, not because Redis answered."""
    from sightstream.stages.pending import StreamReader

    stop = asyncio.Event()

    class Reader(StreamReader):
        async def step(self) -> None:
            if not self._retry.failures:
                raise RedisConnectionError("Connection refused")
            stop.set()  # the daemon stops while Redis is still away: the step gives up

    metrics, p = Metrics(), PipelineSettings(name="p")
    reader = Reader(p, fakeredis.FakeAsyncRedis(), lambda: "c", None, InFlight(1), metrics, stop)  # type: ignore[arg-type]
    with capture_logs() as logs:
        await asyncio.wait_for(reader.run(), 10)
    assert not [e for e in logs if e["event"] == "redis_recovered"]
