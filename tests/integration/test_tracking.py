"""Tracking through the real pipeline (real Redis): a source's frames all meet the same
tracking state, in order, on one daemon; sources are shared among daemons by leases, and a
source whose daemon is gone is taken over with the frames it left pending."""

from __future__ import annotations

import asyncio
import json

import pytest

from sightstream import keys
from tests import tiny_hf
from tests.conftest import encode
from tests.integration.helpers import client_for, entries, pending, running, settings_for, wait_for

pytestmark = pytest.mark.integration
BOXES = '{"boxes": [[10, 10, 40, 40], [50, 20, 90, 60]]}'


@pytest.fixture(scope="module")
def tracker_path(tmp_path_factory):
    return str(tiny_hf.sam2_video(tmp_path_factory.mktemp("sam2v") / "model"))


def tracking(redis_url, tmp_path, tracker_path, **extra):
    settings = settings_for(redis_url, tmp_path, [
        {"name": "tracks", "model": "user/track", "prompt": BOXES, "batch_size": 4,
         "batch_timeout_ms": 50}], **extra)
    settings.models["user"] = {"track": type(settings.models["tiny"]["det"])(
        backend="transformers", task="track", path=str(tracker_path))}
    return settings


def publish(sync_redis, stream: str, n: int, gradient) -> list[str]:
    return [sync_redis.xadd(stream, {"image": encode(gradient, "PNG")}).decode() for _ in range(n)]


def sessions(sync_redis, stream: str) -> list[str]:
    return [json.loads(f["result"])["track_session"]
            for _, f in entries(sync_redis, f"results:tracks:{stream}")]


async def test_each_source_is_tracked_in_order_in_one_session(redis_url, sync_redis, tmp_path, tracker_path,
                                                              gradient):
    ids = {s: publish(sync_redis, s, 6, gradient) for s in ("frames:{a}", "frames:{b}")}
    async with running(tracking(redis_url, tmp_path, tracker_path)):
        await wait_for(lambda: all(sync_redis.xlen(f"results:tracks:{s}") == 6 for s in ids), 60, "12 results")
    for stream, frame_ids in ids.items():
        results = entries(sync_redis, f"results:tracks:{stream}")
        assert [f["frame_id"].decode() for _, f in results] == frame_ids  # processed in order
        assert all(f["task"] == b"track" for _, f in results)
        assert len(set(sessions(sync_redis, stream))) == 1
        tracked = [d["track_id"] for _, f in results for d in json.loads(f["result"])["detections"]]
        assert tracked and set(tracked) <= {1, 2}
        assert pending(sync_redis, stream, "tracks") == 0
    assert sessions(sync_redis, "frames:{a}")[0] != sessions(sync_redis, "frames:{b}")[0]


async def test_daemons_share_the_sources_and_take_over_a_stopped_ones(redis_url, sync_redis, tmp_path,
                                                                      tracker_path, gradient):
    streams = ["frames:{a}", "frames:{b}"]
    for s in streams:
        sync_redis.xadd(s, {"image": encode(gradient, "PNG")})
    settings = tracking(redis_url, tmp_path, tracker_path)
    async with running(settings, host="one") as one:
        async with running(settings, host="two") as two:
            # each daemon ends up with one source (the first took both, then gave one back)
            await wait_for(lambda: sorted(one.runs["tracks"].ingest.streams + two.runs["tracks"].ingest.streams)
                           == streams and len(two.runs["tracks"].ingest.streams) == 1, 30, "a source each")
            for s in streams:
                publish(sync_redis, s, 4, gradient)
            await wait_for(lambda: all(sync_redis.xlen(f"results:tracks:{s}") == 5 for s in streams), 60)
            owners = {s: sync_redis.get(keys.source_lease("tracks", s)) for s in streams}
            assert set(owners.values()) == {b"one:0", b"two:0"}
            # Either daemon's control plane tells the whole group's backlog, every source
            client = await client_for(one)
            try:
                described = await (await client.get("/pipelines/tracks")).json()
            finally:
                await client.close()
            assert sorted(src["stream"] for src in described["sources"]) == streams
            assert described["pending"] == 0
            # and which daemon reads each source
            assert {src["stream"]: src["reader"] for src in described["sources"]} == {
                s: owner.decode() for s, owner in owners.items()}
        # "two" stopped and gave its source back: "one" takes it and tracks it afresh
        await wait_for(lambda: len(one.runs["tracks"].ingest.streams) == 2, 30, "one takes both")
        for s in streams:
            publish(sync_redis, s, 3, gradient)
        await wait_for(lambda: all(sync_redis.xlen(f"results:tracks:{s}") == 8 for s in streams), 60)
    moved = next(s for s, owner in owners.items() if owner == b"two:0")
    kept = next(s for s in streams if s != moved)
    assert len(set(sessions(sync_redis, kept)[1:])) == 1  # one daemon all along after the handover
    assert sessions(sync_redis, moved)[-1] not in sessions(sync_redis, moved)[:5]
    assert all(pending(sync_redis, s, "tracks") == 0 for s in streams)


async def test_a_source_left_by_a_dead_daemon_is_taken_over_with_its_pending_frames(
    redis_url, sync_redis, tmp_path, tracker_path, gradient
):
    stream = "frames:{a}"
    ids = publish(sync_redis, stream, 3, gradient)
    sync_redis.xgroup_create(stream, "tracks", id="0")
    sync_redis.xreadgroup("tracks", "ghost:0", {stream: ">"}, count=2)  # then it died
    sync_redis.set(keys.source_lease("tracks", stream), "ghost:0", px=1500)
    # a reclaim idle far beyond the test: only the takeover can recover the ghost's frames
    async with running(tracking(redis_url, tmp_path, tracker_path, reclaim_min_idle_ms=600_000)) as daemon:
        await wait_for(lambda: sync_redis.xlen(f"results:tracks:{stream}") == 3, 30, "3 results")
        assert daemon.runs["tracks"].reclaimer.reclaimed == 0
    results = entries(sync_redis, f"results:tracks:{stream}")
    assert [f["frame_id"].decode() for _, f in results] == ids  # the ghost's two first, in order
    assert pending(sync_redis, stream, "tracks") == 0


def test_a_chained_tracker_keeps_its_fixed_prompt_of_boxes(redis_url, tmp_path, tracker_path):
    """The tracker takes a fixed prompt's boxes on a source's first frame, chained or not
    (docs/models.md): only SAM2's segmenters, whose boxes come from upstream, keep labels only."""
    from sightstream.daemon.daemon import Daemon

    settings = tracking(redis_url, tmp_path, tracker_path)
    settings.pipelines.insert(0, type(settings.pipelines[0])(name="people"))
    settings.pipelines[1].prompt_from = "people"
    settings.pipelines[1].input = ["results:people:frames:*"]
    Daemon(settings)  # no ConfigError


async def test_a_daemon_that_joins_late_is_handed_a_busy_source(redis_url, sync_redis, tmp_path, gradient):
    """Busy sources always have frames in flight, so they are never surplus to give back: the
    first daemon would keep every busy one and the late one get only idle ones. Balancing by
    load hands a busy one over, once drained, and its results stay in order, none doubled."""
    busy, idle = ["frames:{a}", "frames:{b}"], ["frames:{c}", "frames:{d}"]
    image = encode(gradient, "PNG")
    sent: dict[str, list[str]] = {s: [] for s in busy}
    for s in idle:
        sync_redis.xadd(s, {"image": image})
    settings = settings_for(redis_url, tmp_path, [
        {"name": "tracks", "model": "fake/track", "batch_size": 2, "batch_timeout_ms": 10}],
        fakes={"track": {"task": "track", "claims_task": "track", "delay_s": 0.05}})
    feeding = True

    async def feed() -> None:  # 2 × 30 frames/s: more than one daemon does (2 per 50 ms), less than two
        while feeding:
            for s in busy:
                sent[s].append(sync_redis.xadd(s, {"image": image}).decode())
            await asyncio.sleep(1 / 30)

    def busy_read_by(daemon) -> set[str]:
        return set(daemon.runs["tracks"].ingest.streams) & set(busy)

    feeder = asyncio.create_task(feed())
    try:
        async with running(settings, host="one") as one:
            await wait_for(lambda: len(one.runs["tracks"].ingest.streams) == 4, 20, "one reads all four")
            await asyncio.sleep(1.5)  # the idle ones' first frames are done: they are idle now
            async with running(settings, host="two") as two:
                await wait_for(lambda: len(busy_read_by(one)) == len(busy_read_by(two)) == 1
                               and len(two.runs["tracks"].ingest.streams) == 2, 30, "a busy source each")
                await asyncio.sleep(2)  # and it stays so
                assert len(busy_read_by(one)) == len(busy_read_by(two)) == 1
                feeding = False
                await feeder
                await wait_for(lambda: all(sync_redis.xlen(f"results:tracks:{s}") == len(sent[s]) for s in busy),
                               60, "every frame's result")
    finally:
        feeding = False
        await feeder
    for s in busy:
        frame_ids = [f["frame_id"].decode() for _, f in entries(sync_redis, f"results:tracks:{s}")]
        assert frame_ids == sent[s]  # each once, in order, across the handover
        assert pending(sync_redis, s, "tracks") == 0


async def test_a_daemon_publishes_the_frames_per_second_its_sources_give_the_model(
        redis_url, sync_redis, tmp_path, gradient):
    """The load tracking daemons balance by: frames per second per source, at most the
    pipeline's `fps` (the sampler keeps no more), and idle sources count nothing."""
    settings = settings_for(redis_url, tmp_path, [
        {"name": "tracks", "model": "fake/track", "fps": 5, "batch_size": 4, "batch_timeout_ms": 10}],
        fakes={"track": {"task": "track", "claims_task": "track"}})
    image = encode(gradient, "PNG")
    sync_redis.xadd("frames:{idle}", {"image": image})
    feeding = True

    async def feed() -> None:  # 20 frames/s on one camera, 2 on the other
        n = 0
        while feeding:
            sync_redis.xadd("frames:{fast}", {"image": image})
            if n % 10 == 0:
                sync_redis.xadd("frames:{slow}", {"image": image})
            n += 1
            await asyncio.sleep(1 / 20)

    feeder = asyncio.create_task(feed())
    try:
        async with running(settings, host="one") as one:
            ingest = one.runs["tracks"].ingest
            await wait_for(lambda: len(ingest.streams) == 3, 20, "all three read")
            await asyncio.sleep(4)
            fps = {s: ingest._fps(f"frames:{{{s}}}") for s in ("fast", "slow", "idle")}
            word = sync_redis.get(keys.source_member("tracks", one.consumer)).decode()
    finally:
        feeding = False
        await feeder
    assert fps["fast"] == 5  # capped: 20 a second are read, 5 reach the model
    assert 1 <= fps["slow"] <= 3 and fps["idle"] < 0.5, fps
    form, load, _ = word.split(":")
    assert form == "v3" and float(load) == pytest.approx(sum(fps.values()), abs=2)
