"""A pipeline's `input` may list video URLs: each is read by one daemon of the group at a time,
its results in `results:<pipeline>:<url>`, taken over when that daemon stops; the pipeline's
prompt applies, and its changes."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import quote

import pytest

from sightstream import keys
from sightstream.status import status
from tests import hls
from tests.conftest import encode
from tests.integration.helpers import client_for, entries, running, settings_for, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    hls.make_hls_vod(root / "vod", seconds=4, fps=10)
    hls.make_hls_vod(root / "live", seconds=40, fps=10)
    return root


async def test_a_vod_url_and_a_stream_in_one_pipeline(redis_url, sync_redis, tmp_path, videos, gradient):
    with hls.static_server(videos) as server:
        url = server.url("vod/index.m3u8")
        settings = settings_for(redis_url, tmp_path, [{"input": ["frames:*", url], "fps": 2}],
                                jobs={"poll_s": 0.2})
        sync_redis.xadd("frames:{a}", {"image": encode(gradient)})
        async with running(settings) as d:
            await wait_for(lambda: sync_redis.xlen(f"results:people:{url}") == 8, what="the video's results")
            await wait_for(lambda: sync_redis.xlen("results:people:frames:{a}") == 1, what="the stream's result")
            client = await client_for(d)
            try:
                (video,) = (await (await client.get("/pipelines/people")).json())["videos"]
                assert video["url"] == url and video["processed"] == 8
                r = await client.delete(f"/jobs/{video['job_id']}")
                assert r.status == 409 and "pipeline people" in (await r.json())["error"]["message"]
                # `sightstream status` shows it too (an input nobody reads was seen nowhere there)
                lines: list[str] = []
                base = str(client.make_url("")).rstrip("/")
                assert await asyncio.to_thread(status, base, "", False, lines.append) == 0
                table = lines[0].split("VIDEO INPUT")[1]
                row = next(line for line in table.splitlines() if line.startswith(url))
                assert row.split()[1:5] == ["people", "completed", d.consumer, "8"]
            finally:
                await client.close()
        results = entries(sync_redis, f"results:people:{url}")
        assert [f["frame_id"] for _, f in results] == [str(i * 5).encode() for i in range(8)]
        assert all(f["pipeline"] == b"people" and f["source"] == url.encode() and "job_id" not in f
                   for _, f in results)
    # A daemon that starts again does not read the finished VOD again.
    async with running(settings):
        await wait_for(lambda: sync_redis.xlen("results:people:frames:{a}") == 1)
    assert sync_redis.xlen(f"results:people:{url}") == 8


async def test_live_inputs_are_shared_taken_over_and_follow_the_prompt(redis_url, sync_redis, tmp_path, videos):
    with hls.live_hls(videos / "live" / "index.m3u8") as one, hls.live_hls(videos / "live" / "index.m3u8") as two:
        urls = [one.url, two.url]
        settings = settings_for(redis_url, tmp_path, [
            {"input": urls, "fps": 2, "model": "fake/echo", "prompt": "cats", "batch_timeout_ms": 20}],
            fakes={"echo": {"adapter": "Echo"}}, jobs={"poll_s": 0.2, "lease_ttl_ms": 2000})
        async with running(settings, host="a") as a:
            async with running(settings, host="b") as b:
                # One each (a fair share), once both have looked.
                await wait_for(lambda: len(a.job_runner.running) == 1 and len(b.job_runner.running) == 1, 15,
                               "one input on each daemon")
                await wait_for(lambda: all(sync_redis.xlen(f"results:people:{u}") >= 2 for u in urls), 15)
                await a.prompts.set("people", "dogs")
                await wait_for(lambda: all(json.loads(f["result"])["prompt"]["text"] == "dogs" for u in urls
                                           for _, f in entries(sync_redis, f"results:people:{u}")[-1:]), 10,
                               "results with the new prompt")
                client = await client_for(a)  # the input's job says the prompt it runs with ("" before)
                try:
                    job = await (await client.get(f"/jobs/{keys.input_job_id('people', urls[0])}")).json()
                finally:
                    await client.close()
                assert job["prompt"] == "dogs"
            # b stopped: its input goes to a, which resumes it (live: from now), nothing twice.
            await wait_for(lambda: len(a.job_runner.running) == 2, 15, "the input taken over")
            counts = {u: sync_redis.xlen(f"results:people:{u}") for u in urls}
            await wait_for(lambda: all(sync_redis.xlen(f"results:people:{u}") >= counts[u] + 2 for u in urls), 15)
        for u in urls:
            results = entries(sync_redis, f"results:people:{u}")
            frames = [int(f["frame_id"]) for _, f in results]
            assert len(frames) == len(set(frames)) and frames == sorted(frames)
            versions = [int(f["prompt_version"]) for _, f in results]
            assert versions == sorted(versions) and versions[0] == 1 and versions[-1] == 2


async def test_a_file_input_missing_or_not_a_video_fails_alone_and_the_daemon_runs(
        redis_url, sync_redis, tmp_path, gradient):
    """A file input deleted after it was read (or on another host's disk only) stopped the
    daemon at start, exit 2, and every pipeline with it; a file that is not a video was retried
    for ever, `running`. Each now fails on its own, saying why, and the rest goes on."""
    junk = tmp_path / "notes.mp4"
    junk.write_text("not a video")
    gone, junk_url = f"file://{tmp_path}/gone.mp4", f"file://{junk}"
    settings = settings_for(redis_url, tmp_path, [{"input": ["frames:*", gone, junk_url], "fps": 2}],
                            jobs={"poll_s": 0.2})
    sync_redis.xadd("frames:{a}", {"image": encode(gradient)})
    async with running(settings) as d:
        client = await client_for(d)
        try:
            async def statuses() -> dict:
                videos = (await (await client.get("/pipelines/people")).json())["videos"]
                return {v["url"]: v for v in videos}

            for _ in range(200):
                videos = await statuses()
                if all(videos.get(u, {}).get("status") == "failed" for u in (gone, junk_url)):
                    break
                await asyncio.sleep(0.1)
            await wait_for(lambda: sync_redis.xlen("results:people:frames:{a}") == 1, what="the stream's result")
        finally:
            await client.close()
    assert videos[gone]["status"] == "failed" and "is not a file" in videos[gone]["last_error"], videos[gone]
    assert videos[junk_url]["status"] == "failed" and "cannot be opened" in videos[junk_url]["last_error"]


async def test_a_video_input_is_on_the_page_in_sources_and_latency_like_a_stream(
        redis_url, sync_redis, tmp_path, videos):
    """A camera's results were written around the stream publisher: no tile on the live page,
    nothing in /sources or `sightstream status`, no latency (the alert could not fire)."""
    with hls.static_server(videos) as server:
        url = server.url("vod/index.m3u8")
        settings = settings_for(redis_url, tmp_path, [{"name": "cams", "input": [url], "fps": 2}],
                                jobs={"poll_s": 0.2})
        async with running(settings) as d:
            await wait_for(lambda: sync_redis.xlen(f"results:cams:{url}") == 8, what="the video's results")
            client = await client_for(d)
            try:
                sources = (await (await client.get("/sources")).json())["sources"]
                (video,) = (await (await client.get("/pipelines/cams")).json())["videos"]
                latency = (await (await client.get("/pipelines/cams")).json())["latency"]
                image = await client.get(f"/sources/cams/{quote(url, safe='')}/latest.jpg")
                body = await image.read()
                metrics = await (await client.get("/metrics")).text()
            finally:
                await client.close()
    (tile,) = sources
    assert (tile["pipeline"], tile["source"], tile["seq"], tile["read"]) == ("cams", url, 8, 8)
    assert image.status == 200 and body[:3] == b"\xff\xd8\xff"
    assert latency["results"] == 8 and latency["p50_ms"] is not None
    assert 'sightstream_e2e_latency_seconds_count{pipeline="cams"} 8.0' in metrics
    assert video["last_frame_at"] and video["last_frame_at"].endswith("Z")


async def test_a_dead_daemon_s_input_is_taken_over_within_its_lease_not_once_it_is_no_longer_counted(
        redis_url, sync_redis, tmp_path, videos):
    """Every live daemon was at its share while the dead one still counted (its video-member
    key lingers up to 25 s, the daemons are counted every 10 s): its camera waited that long,
    not `lease_ttl_ms`. A running input whose lease is free is taken over the share, and not
    handed straight back."""
    with hls.live_hls(videos / "live" / "index.m3u8") as one, hls.live_hls(videos / "live" / "index.m3u8") as two:
        settings = settings_for(redis_url, tmp_path, [{"input": [one.url, two.url], "fps": 2}],
                                jobs={"poll_s": 0.2, "lease_ttl_ms": 2000})
        sync_redis.set(keys.video_member("people", "ghost:0"), "a dead daemon's", px=60_000)  # lingers
        async with running(settings, host="a") as a:
            runner = a.job_runner
            await wait_for(lambda: len(runner.running) == 1, 15, "its share: one of the two")
            (orphan,) = [job_id for job_id in runner._inputs if job_id not in runner.running]
            # as the ghost left it: running, its lease lapsed
            sync_redis.hset(keys.job(orphan), mapping={"status": "running", "holder": "ghost:0"})
            await wait_for(lambda: orphan in runner.running, 3, "the dead daemon's input taken over")
            await asyncio.sleep(2)
            assert orphan in runner.running and len(runner.running) == 2  # not handed back


async def test_daemons_serving_other_pipelines_do_not_shrink_the_share_of_video_inputs(
        redis_url, sync_redis, tmp_path, videos):
    """The share was the inputs over every daemon on the Redis: beside a daemon of another
    config (no video inputs), one of two cameras stayed `pending`, read by nobody."""
    with hls.live_hls(videos / "live" / "index.m3u8") as one, hls.live_hls(videos / "live" / "index.m3u8") as two:
        cams = settings_for(redis_url, tmp_path, [{"name": "cams", "input": [one.url, two.url], "fps": 2}],
                            jobs={"poll_s": 0.2})
        other = settings_for(redis_url, tmp_path, [{"name": "people", "input": ["frames:*"]}])
        async with running(other, host="b"):
            async with running(cams, host="a") as a:
                await wait_for(lambda: len(a.job_runner.running) == 2, 15, "both cameras read")
                await asyncio.sleep(1)
                assert len(a.job_runner.running) == 2
                assert sync_redis.exists(keys.video_member("cams", a.consumer))
            assert not sync_redis.exists(keys.video_member("cams", "a:0"))  # left at stop


@pytest.mark.timeout(60)  # the daemons are counted every 10 s: a hand-over waits for that
async def test_each_pipeline_s_inputs_are_shared_among_the_daemons_that_list_them(
        redis_url, sync_redis, tmp_path, videos):
    """Here: lobby (one camera) and yard (two); a daemon that joins lists the lobby only. One
    share over all three inputs (ceil(3 / 2) = 2) handed a camera back, and a yard camera
    handed back stayed `pending`: the other daemon never takes the yard's."""
    playlist = videos / "live" / "index.m3u8"
    with hls.live_hls(playlist) as lobby, hls.live_hls(playlist) as yard1, hls.live_hls(playlist) as yard2:
        both = settings_for(redis_url, tmp_path, [{"name": "lobby", "input": [lobby.url], "fps": 2},
                                                  {"name": "yard", "input": [yard1.url, yard2.url], "fps": 2}],
                            jobs={"poll_s": 0.2})
        lobby_only = settings_for(redis_url, tmp_path, [{"name": "lobby", "input": [lobby.url], "fps": 2}],
                                  jobs={"poll_s": 0.2})
        async with running(both, host="a") as a:
            await wait_for(lambda: len(a.job_runner.running) == 3, 15, "all three read here")
            async with running(lobby_only, host="b"):
                await asyncio.sleep(12)  # both counted again (every 10 s)
                # the yard is this daemon's alone (both kept), and one lobby camera is a fair
                # share of one among two: nothing to hand over
                assert set(a.job_runner._inputs) == set(a.job_runner.running)


@pytest.mark.timeout(60)  # the daemons are counted every 10 s: the hand-over waits for that
async def test_an_input_handed_over_goes_to_the_daemon_under_its_share_not_back(
        redis_url, sync_redis, tmp_path, videos):
    """A handed-back input stayed `running` with its lease free, as a dead daemon's does: the
    giver (polling faster) took it straight back over its share, every 30 s, and the daemon
    that joined never got it. Let go, it is `pending`: only a daemon under its share takes it."""
    with hls.live_hls(videos / "live" / "index.m3u8") as one, hls.live_hls(videos / "live" / "index.m3u8") as two:
        inputs = [{"input": [one.url, two.url], "fps": 2}]
        fast = settings_for(redis_url, tmp_path, inputs, jobs={"poll_s": 0.2, "lease_ttl_ms": 2000})
        slow = settings_for(redis_url, tmp_path, inputs, jobs={"poll_s": 1.5, "lease_ttl_ms": 2000})
        async with running(fast, host="a") as a:
            await wait_for(lambda: len(a.job_runner.running) == 2, 15, "both inputs on the first daemon")
            async with running(slow, host="b") as b:
                await wait_for(lambda: len(b.job_runner.running) == 1, 30, "one handed to the daemon that joined")
                await asyncio.sleep(3)
                assert len(a.job_runner.running) == len(b.job_runner.running) == 1


async def test_a_1440p_camera_has_a_tile_kept_small(redis_url, sync_redis, tmp_path):
    """Its decoded frame (11 MB) was over the 8 MB a tile may hold: 1440p and 4K cameras had no
    tile, and each 1080p one kept 6 MB. The page keeps a copy at most 960 pixels wide."""
    clip = hls.make_clip(tmp_path / "big.mp4", seconds=1, fps=5, size=(2560, 1440))
    url = f"file://{clip}"
    settings = settings_for(redis_url, tmp_path, [{"name": "cams", "input": [url], "fps": 2}],
                            jobs={"poll_s": 0.2})
    async with running(settings) as d:
        await wait_for(lambda: sync_redis.xlen(f"results:cams:{url}") == 2, what="the video's results")
        snap = d.snapshots.get("cams", url)
        client = await client_for(d)
        try:
            image = await client.get(f"/sources/cams/{quote(url, safe='')}/latest.jpg")
            body = await image.read()
        finally:
            await client.close()
    assert snap is not None and snap.pixels is not None and max(snap.pixels.shape[:2]) <= 960
    assert image.status == 200 and body[:3] == b"\xff\xd8\xff"
    assert json.loads(entries(sync_redis, f"results:cams:{url}")[-1][1]["result"])["width"] == 2560


async def test_a_file_input_on_one_host_s_disk_only_is_left_to_that_host(
        redis_url, sync_redis, tmp_path, monkeypatch):
    """A daemon whose disk lacks an input's file failed the input for the whole fleet; it
    leaves it to one that has it, as it does a user's job."""
    from sightstream.jobs.runner import JobRunner
    from sightstream.jobs.sources import SourceRefused

    clip = hls.make_clip(tmp_path / "clip.mp4", seconds=1, fps=5)
    url = f"file://{clip}"
    has_it = JobRunner._check_runs_here

    def check(self, spec):  # as on a host whose disk lacks the file
        if self._holder_name() == "a:0":
            raise SourceRefused(f"{clip} is not a file")
        return has_it(self, spec)

    monkeypatch.setattr(JobRunner, "_check_runs_here", check)
    settings = settings_for(redis_url, tmp_path, [{"name": "cams", "input": [url], "fps": 2}],
                            jobs={"poll_s": 0.2})
    job_id = keys.input_job_id("cams", url)
    sync_redis.set(keys.consumer_slot("b", 0), "b, not started yet", px=60_000)  # a knows of b
    async with running(settings, host="a") as a:
        await wait_for(lambda: sync_redis.hget(keys.job(job_id), "waiting"), 10, "a leaving it to others")
        sync_redis.delete(keys.consumer_slot("b", 0))
        async with running(settings, host="b"):
            await wait_for(lambda: sync_redis.xlen(f"results:cams:{url}") == 2, 20, "the file read by b")
        job = await a.jobs.get(job_id)
    assert job is not None and job.status == "completed" and not job.error


async def test_a_video_input_waits_for_its_pipeline_s_model(redis_url, sync_redis, tmp_path, videos):
    """The model's file is missing: the pipeline pauses and so do its video inputs' frames,
    sent again once it loads (they were dead-lettered model_error, every one)."""
    weights = tmp_path / "weights.bin"
    with hls.static_server(videos) as server:
        url = server.url("vod/index.m3u8")
        settings = settings_for(redis_url, tmp_path, [{"input": [url], "fps": 2, "model": "fake/w"}],
                                fakes={"w": {"fail_load_unless": str(weights)}}, jobs={"poll_s": 0.2})
        async with running(settings) as d:
            await wait_for(lambda: d.runs["people"].in_flight.paused is not None, what="the pause")
            await asyncio.sleep(1.5)
            assert sync_redis.xlen(f"results:people:{url}") == 0
            weights.write_bytes(b"mended")
            await wait_for(lambda: sync_redis.xlen(f"results:people:{url}") == 8, 30, "the video's results")
        assert not sync_redis.exists(f"deadletter:people:{url}")
        results = entries(sync_redis, f"results:people:{url}")
        assert [f["frame_id"] for _, f in results] == [str(i * 5).encode() for i in range(8)]


async def test_a_video_input_waits_for_its_model_s_file_missing_at_start(redis_url, sync_redis, tmp_path, videos):
    """A start in a rollout's gap: the pipeline waits for the file, and so do its inputs (the
    input was failed, for good, by the check that its model is on this machine)."""
    from tests.tiny_models import constant_yolov8

    path = tmp_path / "rolled-out.onnx"
    with hls.static_server(videos) as server:
        url = server.url("vod/index.m3u8")
        settings = settings_for(redis_url, tmp_path, [{"input": [url], "fps": 2, "model": "tiny/new"}],
                                jobs={"poll_s": 0.2})
        settings.models["tiny"]["new"] = settings.models["tiny"]["det"].model_copy(update={"path": str(path)})
        async with running(settings) as d:
            await wait_for(lambda: "does not exist" in (d.runs["people"].in_flight.paused or ""), what="the pause")
            await asyncio.sleep(1)
            constant_yolov8(path, [[32, 32, 20, 20, 0.1, 0.9]], classes=2, size=64, names={0: "cat", 1: "dog"})
            await wait_for(lambda: sync_redis.xlen(f"results:people:{url}") == 8, 40, "the video's results")
        assert not sync_redis.exists(f"deadletter:people:{url}")
