"""The FPS sampler on fakeredis (with lupa for its Lua): per source, by capture time, and
shared between daemons."""

from __future__ import annotations

import asyncio

import fakeredis
import pytest

from sightstream.frames import Frame
from sightstream.metrics import Metrics
from sightstream.stages.sampler import Sampler


@pytest.fixture
def server():
    return fakeredis.FakeServer()


def sampler(server, fps: float) -> Sampler:
    client = fakeredis.FakeAsyncRedis(server=server)
    q = asyncio.Queue
    return Sampler(fps, client, q(), q(), q(), Metrics(), asyncio.Event())


def frames(source: str, n: int, every_ms: int, start_ms: int = 1_700_000_000_000) -> list[Frame]:
    return [
        Frame("p", source, f"{start_ms + i * every_ms}-0", {}, start_ms + i * every_ms)
        for i in range(n)
    ]


async def test_keeps_at_most_fps_per_second_of_capture_time(server):
    s = sampler(server, fps=2)
    batch = frames("cam1", 60, every_ms=1000 // 30)  # 2 s of 30 fps
    kept = [f for f, keep in zip(batch, await s.decide(batch)) if keep]
    assert len(kept) == 4
    assert kept[0] is batch[0]  # the first frame of a bucket wins


async def test_sources_are_sampled_independently(server):
    s = sampler(server, fps=1)
    batch = frames("cam1", 10, 100) + frames("cam2", 10, 100)
    verdicts = await s.decide(batch)
    assert sum(verdicts[:10]) == 1 and sum(verdicts[10:]) == 1


async def test_two_daemons_share_the_budget(server):
    a, b = sampler(server, fps=1), sampler(server, fps=1)
    batch = frames("cam1", 90, 1000 // 30)  # 3 s
    # The group splits the frames between the daemons, interleaved.
    va = await a.decide(batch[0::2])
    vb = await b.decide(batch[1::2])
    assert sum(va) + sum(vb) == 3


async def test_a_redelivered_winner_is_kept_again(server):
    a, b = sampler(server, fps=1), sampler(server, fps=1)
    batch = frames("cam1", 5, 100)
    assert (await a.decide(batch))[0]
    # Another daemon reclaims the winner after a crash: it must still be processed.
    assert await b.decide([batch[0]]) == [True]
    assert await b.decide([batch[1]]) == [False]


async def test_run_sends_skipped_frames_to_be_acknowledged(server):
    s = sampler(server, fps=1)
    from sightstream.stages.flow import STOP

    for f in frames("cam1", 5, 100):
        s._in.put_nowait(f)
    s._in.put_nowait(STOP)
    await s.run()
    kept = [s._out.get_nowait() for _ in range(s._out.qsize())]
    acked = [s._outcomes.get_nowait() for _ in range(s._outcomes.qsize())]
    assert len(kept) == 2 and kept[-1] is STOP
    assert len(acked) == 4 and {a.reason for a in acked} == {"sampled_out"}


async def test_a_bucket_is_remembered_only_while_redis_keeps_it(server):
    """A camera's clock stepped back (NTP) brings capture times again whose bucket keys Redis
    has let go: a long-running daemon, remembering them for good, sampled those frames out
    (0 of 120 in a black-box run) while a daemon started since processed them."""
    s, fresh = sampler(server, fps=1), sampler(server, fps=1)
    s._ttl_ms = fresh._ttl_ms = 200  # the keys' life (2 minutes in use), shortened for the test
    first = frames("cam1", 3, 1000)
    assert await s.decide(first) == [True, True, True]
    await asyncio.sleep(0.3)  # the keys have expired in Redis
    again = [Frame("p", "cam1", f"1800000000000-{i}", {}, f.ts_ms) for i, f in enumerate(first)]
    assert await s.decide(again) == [True, True, True]  # as a daemon started since decides them
    assert await fresh.decide(again) == [True, True, True]  # and the same winners for the others
