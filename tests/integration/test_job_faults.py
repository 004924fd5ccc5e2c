"""Jobs when things go wrong: results that cannot be written, limits with no frame coming, a
source that never answers, inputs removed from the config, and the runner's own footprint."""

from __future__ import annotations

import asyncio

import pytest

from sightstream.daemon.embedded_redis import free_port
from sightstream.keys import input_job_id
from tests import hls
from tests.integration.helpers import running, serving, settings_for, wait_for
from tests.integration.test_jobs import submit, until_status

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def vod(tmp_path_factory):
    root = tmp_path_factory.mktemp("vod")
    hls.make_hls_vod(root / "vod", seconds=3, fps=10)
    return root


async def test_an_input_whose_results_cannot_be_written_fails_once_and_runs_when_mended(
        redis_url, sync_redis, tmp_path, vod):
    with hls.static_server(vod) as server:
        url = server.url("vod/index.m3u8")
        sync_redis.set(f"results:people:{url}", "a key in the way")
        settings = settings_for(redis_url, tmp_path, [{"input": [url], "fps": 2}], jobs={"poll_s": 0.1})
        job_id = input_job_id("people", url)
        async with running(settings) as d:
            await wait_for(lambda: sync_redis.hget(f"sightstream:job:{{{job_id}}}", "status") == b"failed")
            job = await d.jobs.get(job_id)
            assert "cannot be written" in job.error and "WRONGTYPE" in job.error
            await asyncio.sleep(0.5)
            assert (await d.jobs.get(job_id)).attempt == 1  # failed, not retried in a loop
        sync_redis.delete(f"results:people:{url}")  # mended; a daemon that starts tries it again
        async with running(settings):
            await wait_for(lambda: sync_redis.xlen(f"results:people:{url}") == 6, what="the results")


async def test_an_input_whose_job_redis_lost_is_registered_again(redis_url, sync_redis, tmp_path, vod):
    """Redis restarted without persistence: the input's job is gone with everything else; the
    input goes on (it was registered once, at start, and stopped for good)."""
    with hls.static_server(vod) as server:
        url = server.url("vod/index.m3u8")
        settings = settings_for(redis_url, tmp_path, [{"input": [url], "fps": 2}], jobs={"poll_s": 0.1})
        job_id = input_job_id("people", url)
        async with running(settings):
            await wait_for(lambda: sync_redis.xlen(f"results:people:{url}") == 6, what="the results")
            await wait_for(lambda: sync_redis.hget(f"sightstream:job:{{{job_id}}}", "status") == b"completed")
            sync_redis.flushall()
            await wait_for(lambda: sync_redis.xlen(f"results:people:{url}") == 6, what="the results again")


async def test_a_stream_job_ends_at_max_seconds_with_no_frame_coming(redis_url, tmp_path):
    async with serving(settings_for(redis_url, tmp_path, jobs={"poll_s": 0.1})) as (d, client):
        job_id = await submit(client, source="redis://idle:{s}", max_seconds=1)
        # Ends about 1 s in (a watch every 0.5 s; the stream read wakes every 1 s). Once, in a
        # full-suite run, it took over 5 s and could not be reproduced: the bound is generous.
        job = await until_status(client, job_id, "completed", timeout=15)
        assert job["counts"]["processed"] == 0


async def test_a_video_that_never_answers_fails_the_job_with_the_reason(redis_url, tmp_path):
    settings = settings_for(redis_url, tmp_path, jobs={"poll_s": 0.1, "give_up_s": 1.5, "open_timeout_s": 0.5})
    async with serving(settings) as (d, client):
        job_id = await submit(client, source=f"http://127.0.0.1:{free_port()}/live.m3u8", fps=1)
        job = await until_status(client, job_id, "failed", timeout=10)
        assert job["error"].startswith("no frame from the source for 1.5 s") and "refused" in job["error"].lower()


async def test_a_host_that_does_not_resolve_is_named_and_not_retried_for_long(redis_url, tmp_path):
    """FFmpeg says only "Input/output error" for a host with no address (a typo, most often)."""
    settings = settings_for(redis_url, tmp_path, jobs={"poll_s": 0.1, "open_timeout_s": 2})
    async with serving(settings) as (d, client):
        job_id = await submit(client, source="https://no-such-host.invalid/clip.mp4", fps=1)
        job = await until_status(client, job_id, "failed", timeout=20)
        assert "the host no-such-host.invalid cannot be resolved" in job["error"], job["error"]
        assert "(3 attempts)" in job["error"]  # given up as a 404 is, not after 8 transient tries


async def test_a_stream_key_of_another_type_is_refused(redis_url, sync_redis, tmp_path):
    sync_redis.set("notastream", "x")
    async with serving(settings_for(redis_url, tmp_path)) as (d, client):
        r = await client.post("/jobs", json={"source": "redis://notastream", "model": "tiny/det"})
        assert r.status == 422 and "holds a string" in (await r.json())["error"]["message"]


async def test_an_input_removed_from_the_config_is_retired_and_others_configs_are_left_alone(
        redis_url, sync_redis, tmp_path, vod):
    with hls.live_hls(vod / "vod" / "index.m3u8", window=2) as live:
        first = settings_for(redis_url, tmp_path, [{"input": ["frames:*", live.url], "fps": 2}],
                             jobs={"poll_s": 0.1})
        job_id = input_job_id("people", live.url)
        async with running(first):
            await wait_for(lambda: sync_redis.xlen(f"results:people:{live.url}") >= 1)
        # Another config, with no such pipeline, never takes it …
        other = settings_for(redis_url, tmp_path, [{"name": "faces", "input": ["frames:*"]}], jobs={"poll_s": 0.1})
        async with running(other, host="other") as d:
            await asyncio.sleep(0.5)
            assert job_id not in d.job_runner.running
        # … and the pipeline's own config without the URL retires it.
        removed = settings_for(redis_url, tmp_path, [{"input": ["frames:*"], "fps": 2}], jobs={"poll_s": 0.1})
        async with running(removed) as d:
            await wait_for(lambda: sync_redis.hget(f"sightstream:job:{{{job_id}}}", "status") == b"cancelled")
            assert "no longer in pipeline people's input" in (await d.jobs.get(job_id)).error
            count = sync_redis.xlen(f"results:people:{live.url}")
            await asyncio.sleep(0.5)
            assert sync_redis.xlen(f"results:people:{live.url}") == count and job_id not in d.job_runner.running


async def test_the_runner_holds_no_more_tasks_over_time(redis_url, tmp_path):
    async with running(settings_for(redis_url, tmp_path, jobs={"poll_s": 0.01})):
        await asyncio.sleep(0.3)
        before = len(asyncio.all_tasks())
        await asyncio.sleep(1.0)  # about 100 polls
        assert len(asyncio.all_tasks()) <= before + 2


async def test_a_finished_job_and_its_results_expire_after_ttl(redis_url, sync_redis, tmp_path, gradient):
    settings = settings_for(redis_url, tmp_path, jobs={"poll_s": 0.1, "ttl_s": 1})
    async with serving(settings) as (d, client):
        job_id = await submit(client, source="redis://cams:{ttl}", max_seconds=0.5)
        await until_status(client, job_id, "completed", timeout=5)
        assert 0 < sync_redis.ttl(f"sightstream:job:{{{job_id}}}") <= 1
        await asyncio.sleep(1.3)
        assert (await client.get(f"/jobs/{job_id}")).status == 404
        listed = (await (await client.get("/jobs")).json())["jobs"]
        assert job_id not in [j["job_id"] for j in listed]  # dropped from the index on the way


async def test_a_stream_job_ends_at_max_seconds_even_if_a_read_never_answers(redis_url, tmp_path, monkeypatch):
    """A blocking read that hangs (a lost reply) is given up after a few seconds, so the job
    still ends at max_seconds (a full-suite run once saw one hang past 15 s)."""
    async with serving(settings_for(redis_url, tmp_path, jobs={"poll_s": 0.1})) as (d, client):
        real = d.reader.xread

        async def hung(streams, **kw):
            if any(k == "idle:{h}" or k == b"idle:{h}" for k in streams):
                await asyncio.sleep(3600)
            return await real(streams, **kw)

        monkeypatch.setattr(d.reader, "xread", hung)
        job_id = await submit(client, source="redis://idle:{h}", max_seconds=1)
        job = await until_status(client, job_id, "completed", timeout=10)
        assert job["counts"]["processed"] == 0


async def test_a_job_whose_results_cannot_be_sent_is_paused_not_stuck(redis_url, tmp_path, vod, monkeypatch):
    """Redis drops the connection while the job's results are written, its frames in flight at
    their cap: the reader must not wait forever for a publisher that is gone. The job is paused
    and resumed, and completes."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from sightstream.jobs import run

    real, calls = run.JobRun._publish, []

    async def dropped_once(self, ready):
        calls.append(len(ready))
        if len(calls) == 2:
            raise RedisConnectionError("Connection closed by server.")
        return await real(self, ready)

    monkeypatch.setattr(run.JobRun, "_publish", dropped_once)
    settings = settings_for(redis_url, tmp_path, jobs={"allowed_paths": [str(vod)], "poll_s": 0.1,
                                                       "max_in_flight": 2, "lease_ttl_ms": 2000})
    async with serving(settings) as (d, client):
        job_id = await submit(client, source=f"file://{vod}/vod/index.m3u8", fps=10)
        job = await until_status(client, job_id, "completed", "failed", timeout=30)
        assert job["status"] == "completed", job["error"]
        assert job["attempt"] == 2 and job["counts"]["processed"] == 30  # resumed; each frame once
