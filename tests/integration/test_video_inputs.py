"""A pipeline's `input` may list video URLs: each is read by one daemon of the group at a time,
its results in `results:<pipeline>:<url>`, taken over when that daemon stops; the pipeline's
prompt applies, and its changes."""

from __future__ import annotations

import json

import pytest

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
