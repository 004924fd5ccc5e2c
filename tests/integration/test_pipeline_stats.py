"""GET /pipelines and /pipelines/{name}: rates, counts, group-wide pending and lag, latency."""

from __future__ import annotations

import pytest

from tests.conftest import encode
from tests.integration.helpers import serving, settings_for, wait_for

pytestmark = pytest.mark.integration


async def test_a_pipeline_reports_backlog_counts_rates_and_latency(redis_url, sync_redis, tmp_path, gradient):
    image = encode(gradient)
    for _ in range(12):
        sync_redis.xadd("frames:{a}", {"image": image})
    sync_redis.xadd("frames:{b}", {"image": b"junk"})
    settings = settings_for(redis_url, tmp_path, [{"model": "fake/slow", "batch_size": 1, "max_in_flight": 2}],
                            fakes={"slow": {"delay_s": 0.15}})
    async with serving(settings) as (d, client):
        async def stats():
            r = await client.get("/pipelines/people")
            assert r.status == 200
            return await r.json()

        busy = await stats()  # the model is slow: most frames are still waiting in Redis
        (a,) = [s for s in busy["sources"] if s["stream"] == "frames:{a}"]
        assert a["lag"] + a["pending"] > 2 and a["pending"] <= 2
        assert busy["model"] == "fake/slow" and busy["task"] == "detect" and busy["prompt_version"] == 1

        await wait_for(lambda: sync_redis.xlen("results:people:frames:{a}") == 12, what="every result")
        done = await stats()
        assert done["pending"] == 0 and done["lag"] == 0
        assert done["counts"]["read"] == 13 and done["counts"]["published"] == 12
        assert done["counts"]["dead_lettered"] == {"unsupported_format": 1}
        assert done["latency"]["results"] == 12 and 0 <= done["latency"]["p50_ms"] <= done["latency"]["p99_ms"]
        assert done["fps_out"] > 0  # results came within the last 10 s

        listed = (await (await client.get("/pipelines")).json())["pipelines"]
        assert [p["name"] for p in listed] == ["people"] and listed[0]["sources"] is None
        r = await client.get("/pipelines/nope")
        assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"


async def test_lag_after_a_producers_trim_is_what_is_left_to_read(redis_url, sync_redis):
    """Redis 7.0 keeps counting entries trimmed before the group read them as lag, for ever:
    the backlog alert then fired on a group that had read everything."""
    import redis.asyncio

    from sightstream.daemon.backlog import group_backlog

    stream, group = "frames:{trimmed}", "people"
    sync_redis.xgroup_create(stream, group, "0", mkstream=True)
    for i in range(10):
        sync_redis.xadd(stream, {"i": i})
    sync_redis.xreadgroup(group, "c", {stream: ">"}, count=5)
    sync_redis.xtrim(stream, maxlen=3, approximate=False)  # 6 and 7 go unread
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        (before,) = await group_backlog(client, group, [stream])
        assert before.lag == 3  # Redis says 5: more than the stream holds
        sync_redis.xreadgroup(group, "c", {stream: ">"})
        (after,) = await group_backlog(client, group, [stream])
        assert after.lag == 0 and after.pending == 8  # Redis says 2, and goes on saying it
    finally:
        await client.aclose()


async def test_a_camera_whose_clock_is_off_is_named_with_its_skew(redis_url, sync_redis, tmp_path, gradient):
    """A camera a day behind read as a day late in every latency figure (and fired the latency
    alert), one ahead as 0 ms; nothing named the camera or its clock."""
    import time

    from structlog.testing import capture_logs

    image, now = encode(gradient), int(time.time() * 1000)
    with capture_logs() as logged:
        async with serving(settings_for(redis_url, tmp_path)) as (d, client):
            for stream, offset in (("frames:{behind}", -86_400_000), ("frames:{ahead}", 30_000),
                                   ("frames:{right}", 0)):
                for _ in range(3):
                    sync_redis.xadd(stream, {"image": image, "ts": str(now + offset)})
            await wait_for(lambda: all(sync_redis.xlen(f"results:people:frames:{{{s}}}") == 3
                                       for s in ("behind", "ahead", "right")))
            sources = {s["stream"]: s for s in (await (await client.get("/pipelines/people")).json())["sources"]}
            tiles = {s["source"]: s for s in (await (await client.get("/sources")).json())["sources"]}
    assert -86_410_000 < sources["frames:{behind}"]["clock_skew_ms"] < -86_390_000
    assert 20_000 < sources["frames:{ahead}"]["clock_skew_ms"] <= 30_000
    assert abs(sources["frames:{right}"]["clock_skew_ms"]) < 2_000
    said = {e["source"]: e for e in logged if e["event"] == "source_clock_skew"}
    assert sorted(e["source"] for e in logged if e["event"] == "source_clock_skew") == sorted(said) \
        == ["frames:{ahead}", "frames:{behind}"]
    assert "1.0 days before they reached Redis" in said["frames:{behind}"]["problem"]
    assert tiles["frames:{ahead}"]["latency_ms"] == 0  # as its results say, not -30 s
