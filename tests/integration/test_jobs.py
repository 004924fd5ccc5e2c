"""Jobs over a real socket and a real redis-server: HLS VOD and live, MP4 files, Redis
streams; paging results; cancel; sources that fail while others flow; fenced writes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import pytest
from structlog.testing import capture_logs

from sightstream import keys
from sightstream.config import ModelEntry
from sightstream.jobs.store import JobSpec, JobStore
from sightstream.leases import Lease
from sightstream.redis_conn import make_client, run_pipelined
from tests import hls
from tests.conftest import encode
from tests.fake_adapters import entry as fake_entry
from tests.integration.helpers import crashed_process, serving, settings_for, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    hls.make_hls_vod(root / "vod", seconds=4, fps=10)
    hls.make_clip(root / "clip.mp4", seconds=3, fps=10)
    hls.make_hls_vod(root / "live", seconds=30, fps=10)
    return root


def job_settings(redis_url, tmp_path, videos, **jobs):
    return settings_for(redis_url, tmp_path, jobs={"allowed_paths": [str(videos)], "poll_s": 0.2,
                                                   "stall_s": 2, "lease_ttl_ms": 2000, **jobs})




async def submit(client, **body) -> str:
    r = await client.post("/jobs", json={"model": "tiny/det", **body})
    created = await r.json()
    assert r.status == 201, created
    assert r.headers["Location"] == f"/jobs/{created['job_id']}"
    assert created["results_stream"] == f"results:job:{{{created['job_id']}}}"
    return created["job_id"]


async def until_status(client, job_id, *statuses, timeout=30.0) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        job = await (await client.get(f"/jobs/{job_id}")).json()
        if job["status"] in statuses:
            return job
        assert asyncio.get_running_loop().time() < deadline, f"job still {job['status']}: {job}"
        await asyncio.sleep(0.1)


async def all_results(client, job_id, count=3) -> list[dict]:
    out, after = [], None
    while True:
        r = await client.get(f"/jobs/{job_id}/results", params={"count": count, **({"after": after} if after else {})})
        page = await r.json()
        out += page["results"]
        after = page["next_after"]
        if page["done"]:
            return out
        assert page["results"], "an ended job's pages end with done"


async def test_an_hls_vod_gives_duration_times_fps_results_in_pages(redis_url, tmp_path, videos):
    with hls.static_server(videos) as server:
        async with serving(job_settings(redis_url, tmp_path, videos)) as (d, client):
            job_id = await submit(client, source=server.url("vod/index.m3u8"), fps=2)
            job = await until_status(client, job_id, "completed")
            assert job["error"] == "" and job["attempt"] == 1 and job["holder"] == d.consumer
            assert job["counts"]["processed"] == 8 and job["counts"]["dead_lettered"] == 0
            assert job["counts"]["decoded"] >= 8 and job["counts"]["sampled"] == 8
            assert job["progress"]["duration_s"] == pytest.approx(4, abs=0.2)
            # read to its end: the last frame sampled (3.5 s at fps 2) lies before it, yet it is all done
            assert job["progress"]["fraction"] == 1.0
            assert job["timings"]["total_s"] > 0 and job["timings"]["open_s"] > 0
            results = await all_results(client, job_id)
            assert len(results) == 8
            frames = [int(r["fields"]["frame_id"]) for r in results]
            assert frames == sorted(frames) and len(set(frames)) == 8 and frames[0] == 0
            first = results[0]["fields"]
            assert first["source"] == server.url("vod/index.m3u8") and first["job_id"] == job_id
            assert first["task"] == "detect" and first["result"]["detections"][0]["label"] == "dog"
            assert (first["result"]["width"], first["result"]["height"]) == hls.SIZE
            pts = [int(r["fields"]["pts_ms"]) for r in results]
            assert pts == sorted(pts) and pts[-1] <= 4000


async def test_a_file_job_and_every_refused_source(redis_url, tmp_path, videos):
    settings = job_settings(redis_url, tmp_path, videos).model_copy(deep=True)
    settings.models["fake"] = {"badopt": ModelEntry(**fake_entry(threshold="abc"))}
    async with serving(settings) as (d, client):
        job_id = await submit(client, source=f"file://{videos}/clip.mp4", fps=5, max_frames=4)
        job = await until_status(client, job_id, "completed")
        assert job["counts"]["processed"] == 4
        # a second of video at 10 fps: ten frames, 0 to 0.9 s (not the one at 1.0 s too)
        second = await submit(client, source=f"file://{videos}/clip.mp4", fps=10, max_seconds=1)
        assert (await until_status(client, second, "completed"))["counts"]["processed"] == 10
        pts = [int(r["fields"]["pts_ms"]) for r in await all_results(client, second, 100)]
        assert pts == [100 * i for i in range(10)]
        for after in ("99999999999999999999999", "1-18446744073709551616", "x"):
            r = await client.get(f"/jobs/{job_id}/results", params={"after": after})
            assert r.status == 422, after
        last = "18446744073709551615-18446744073709551615"  # nothing can come after the last ID
        page = await (await client.get(f"/jobs/{job_id}/results", params={"after": last})).json()
        assert page["results"] == [] and page["done"]

        async def refused(status, **body):
            r = await client.post("/jobs", json={"model": "tiny/det", **body})
            assert r.status == status, await r.text()
            return (await r.json())["error"]["message"]

        assert "source must start with" in await refused(422, source="ftp://x/y.mp4")
        assert "allowed_paths" in await refused(422, source="file:///etc/passwd")
        assert "not a file" in await refused(422, source=f"file://{videos}/nope.mp4")
        assert "source" in await refused(422, fps=1)
        assert "fps" in await refused(422, source=f"file://{videos}/clip.mp4", fps=0)
        assert "fps" in await refused(422, source=f"file://{videos}/clip.mp4", fps="fast")
        assert "max_frames" in await refused(422, source=f"file://{videos}/clip.mp4", max_frames=True)
        assert "fps" in await refused(422, source=f"file://{videos}/clip.mp4", fps=False)
        assert "fps" in await refused(422, source=f"file://{videos}/clip.mp4", fps="2")  # a JSON number
        assert await submit(client, source=f"file://{videos}/clip.mp4", max_frames=2.0)  # an integer, to JSON Schema
        r = await client.post("/jobs", data=b'{"source": "file:///x.mp4", "fps": NaN}')
        assert r.status == 422 and "finite" in (await r.json())["error"]["message"]
        r = await client.post("/jobs", data=b" ")
        assert r.status == 400 and "body is empty" in (await r.json())["error"]["message"]
        assert "own output" in await refused(422, source="redis://results:people:frames:{a}")
        # taken as literal keys, these waited for ever on nothing
        assert "is a glob" in await refused(422, source="redis://frames:*")
        assert "names a Redis server" in await refused(422, source="redis://127.0.0.1:6379/frames:{a}")
        # each was a 500 with a traceback, or a job that crashed when read
        r = await client.post("/jobs", json={"model": "fake/badopt", "source": f"file://{videos}/clip.mp4"})
        body = await r.json()  # was 201, then "completed" with its frame dead-lettered model_error
        assert r.status == 409 and "could not be set up with its options" in body["error"]["message"], body
        assert "Invalid IPv6 URL" in await refused(422, source="http://[::1:8129/x.mp4")
        assert "control character" in await refused(422, source=f"file://{videos}/clip.mp4%00.txt")
        assert "Port out of range" in await refused(422, source="http://127.0.0.1:99999/x.mp4")
        assert "holds a space" in await refused(422, source="http://exa mple.com/x.mp4")
        assert "no/such" in await refused(404, source=f"file://{videos}/clip.mp4", model="no/such")
        assert "takes no prompt" in await refused(422, source=f"file://{videos}/clip.mp4", prompt="cats")
        r = await client.get("/jobs/0123456789abcdef0123")
        assert r.status == 404


async def test_a_file_job_reads_nothing_outside_allowed_paths_whatever_it_leads_to(redis_url, tmp_path, videos):
    """Accepted under allowed_paths, a job's file is opened again by FFmpeg: a playlist there
    may name segments anywhere on the disk (and a link swapped in before a reopen is followed).
    The job fails saying so, and no result is of the file outside."""
    outside = tmp_path / "outside"
    outside.mkdir()
    hls.make_clip(outside / "secret.mp4", seconds=1, fps=10)
    playlist = videos / "vod" / "escape.m3u8"
    playlist.write_text((videos / "vod" / "index.m3u8").read_text().replace(
        "index0.ts", str(outside / "secret.mp4")))
    async with serving(job_settings(redis_url, tmp_path, videos)) as (d, client):
        job_id = await submit(client, source=f"file://{playlist}", fps=5)
        job = await until_status(client, job_id, "completed", "failed")
        assert job["status"] == "failed" and "secret.mp4 leads outside jobs.allowed_paths" in job["error"], job
        assert job["counts"]["processed"] == 0


async def test_with_allowed_hosts_a_redirect_is_not_followed(redis_url, tmp_path, videos):
    """allowed_hosts checks the URL given: a redirect from an allowed host to any other (the
    host's loopback, a cloud's metadata address) was followed. With allowed_hosts set, a job's
    redirect fails it, saying why; without, redirects are followed as before."""
    from aiohttp import web

    with hls.static_server(videos) as files:
        app = web.Application()

        async def redirect(request: web.Request) -> web.Response:
            raise web.HTTPFound(files.url("clip.mp4"))  # to 127.0.0.1: not an allowed host

        app.router.add_get("/clip.mp4", redirect)
        with hls.ThreadServer(app) as server:
            source = server.url("clip.mp4").replace("127.0.0.1", "localhost")
            async with serving(job_settings(redis_url, tmp_path, videos, allowed_hosts=["localhost"])) as (d, client):
                job = await until_status(client, await submit(client, source=source, fps=2), "completed", "failed")
                assert job["status"] == "failed" and "redirects to http://127.0.0.1" in job["error"], job
                assert "redirects are not followed" in job["error"], job
                assert job["counts"]["processed"] == 0
            async with serving(job_settings(redis_url, tmp_path, videos)) as (d, client):
                job = await until_status(client, await submit(client, source=source, fps=2), "completed", "failed")
                assert job["status"] == "completed" and job["counts"]["processed"] == 6, job


async def test_a_damaged_mp4_fails_its_job_and_is_not_taken_for_a_live_stream(redis_url, tmp_path, videos):
    """No duration in its index, as a live stream has none; but an MP4 or a file is never live:
    it fails after its tries, saying why, not after give_up_s as a live stream that stopped."""
    damaged = hls.make_damaged_clip(videos / "damaged.mp4")
    settings = job_settings(redis_url, tmp_path, videos, give_up_s=600)
    with hls.static_server(videos) as server:
        async with serving(settings) as (d, client):
            for source in (f"file://{damaged}", server.url("damaged.mp4")):
                job_id = await submit(client, source=source, fps=2)
                job = await until_status(client, job_id, "completed", "failed", timeout=20)
                assert job["status"] == "failed" and "live" not in job["error"], job["error"]
                assert "cannot be read (damaged?)" in job["error"], job["error"]


async def test_an_mp4_indexed_at_its_end_from_a_server_without_ranges_fails_saying_why(
        redis_url, tmp_path, videos):
    """FFmpeg must jump to the index at the end and back; a server that ignores Range (as
    python -m http.server does) makes the clip fail as if damaged: the error says what to do."""
    from aiohttp import web

    # not a tiny one: FFmpeg reads a few KB whole into its buffer, where seeking needs no Range
    clip = hls.make_clip(tmp_path / "clip.mp4", seconds=10, fps=10, size=(640, 480)).read_bytes()
    assert clip.find(b"moov") > clip.find(b"mdat")  # the muxer's default: index last

    async def whole(request: web.Request) -> web.Response:  # a 200 with every byte, whatever asked
        return web.Response(body=clip, content_type="video/mp4")

    app = web.Application()
    app.router.add_get("/clip.mp4", whole)
    async with serving(job_settings(redis_url, tmp_path, videos)) as (d, client):
        with hls.ThreadServer(app) as server:
            job_id = await submit(client, source=server.url("clip.mp4"), fps=2)
            job = await until_status(client, job_id, "completed", "failed", timeout=30)
    assert job["status"] == "failed" and "does not answer Range requests" in job["error"], job
    assert "-movflags +faststart" in job["error"]


async def test_live_hls_with_max_seconds_then_cancel_and_listing(redis_url, tmp_path, videos):
    with hls.live_hls(videos / "live" / "index.m3u8") as live:
        async with serving(job_settings(redis_url, tmp_path, videos)) as (d, client):
            short = await submit(client, source=live.url, fps=2, max_seconds=2)
            endless = await submit(client, source=live.url, fps=2)
            job = await until_status(client, short, "completed", timeout=30)
            assert 3 <= job["counts"]["processed"] <= 5 and job["progress"]["duration_s"] is None

            await wait_for_results(client, endless, 2)
            started = asyncio.get_running_loop().time()
            r = await client.delete(f"/jobs/{endless}")
            assert r.status == 200 and (await r.json())["status"] == "cancelled"
            await wait_for(lambda: endless not in d.job_runner.running, 1.0, "the job to stop on its daemon")
            assert asyncio.get_running_loop().time() - started < 1.0
            count = len((await (await client.get(f"/jobs/{endless}/results?count=1000")).json())["results"])
            await asyncio.sleep(1.5)
            job = await (await client.get(f"/jobs/{endless}")).json()
            assert job["status"] == "cancelled" and job["counts"]["processed"] == count  # nothing after
            metrics = await (await client.get("/metrics")).text()
            assert 'sightstream_jobs_finished_total{status="cancelled"} 1.0' in metrics
            # its counts as the run left them (the periodic write may not have been made yet: 0 decoded)
            assert job["counts"]["decoded"] >= job["counts"]["sampled"] >= job["counts"]["processed"], job["counts"]
            assert (await client.delete(f"/jobs/{endless}")).status == 409
            assert (await client.delete("/jobs/0123456789abcdef0123")).status == 404

            listed = await (await client.get("/jobs?limit=1")).json()
            assert [j["job_id"] for j in listed["jobs"]] == [endless]  # newest first
            more = await (await client.get(f"/jobs?limit=1&cursor={listed['next_cursor']}")).json()
            assert [j["job_id"] for j in more["jobs"]] == [short]
            done = await (await client.get("/jobs?status=completed")).json()
            assert [j["job_id"] for j in done["jobs"]] == [short] and done["next_cursor"] is None
            assert (await client.get("/jobs?status=lost")).status == 422


async def wait_for_results(client, job_id, n):
    for _ in range(200):
        page = await (await client.get(f"/jobs/{job_id}/results?count=1000")).json()
        if len(page["results"]) >= n:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"fewer than {n} results for {job_id}")


async def test_a_dead_source_fails_its_job_while_others_flow(redis_url, tmp_path, videos):
    with hls.static_server(videos) as server:
        async with serving(job_settings(redis_url, tmp_path, videos)) as (d, client):
            missing = await submit(client, source=server.url("gone/index.m3u8"), fps=2)
            good = await submit(client, source=server.url("vod/index.m3u8"), fps=2)
            job = await until_status(client, missing, "failed", timeout=30)
            assert "cannot be opened" in job["error"] and "404" in job["error"]
            assert (await until_status(client, good, "completed"))["counts"]["processed"] == 8


async def test_a_stalled_live_source_is_reopened_and_resumes(redis_url, tmp_path, videos):
    with hls.live_hls(videos / "live" / "index.m3u8") as live:
        async with serving(job_settings(redis_url, tmp_path, videos)) as (d, client):
            job_id = await submit(client, source=live.url, fps=2)
            await wait_for_results(client, job_id, 2)
            live.stall()

            async def reopened() -> bool:  # past stall_s: the reader gave up on that connection
                job = await (await client.get(f"/jobs/{job_id}")).json()
                return "no frame for 2 s" in (job["progress"].get("last_error") or "")

            for _ in range(100):
                if await reopened():
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the stalled source was not reopened within 10 s")
            before = len((await (await client.get(f"/jobs/{job_id}/results?count=1000")).json())["results"])
            live.resume()
            await wait_for_results(client, job_id, before + 3)
            job = await (await client.get(f"/jobs/{job_id}")).json()
            assert job["status"] == "running"
            assert "no frame for 2 s" in job["progress"]["last_error"]  # the watchdog reopened it
            frames = [r["fields"]["frame_id"] for r in
                      (await (await client.get(f"/jobs/{job_id}/results?count=1000")).json())["results"]]
            assert len(frames) == len(set(frames))  # nothing reported twice across the reopen


async def test_a_redis_stream_job(redis_url, sync_redis, tmp_path, videos, gradient):
    async with serving(job_settings(redis_url, tmp_path, videos)) as (d, client):
        sync_redis.xadd("cams:{x}", {"image": encode(gradient)})  # before the job: not read
        job_id = await submit(client, source="redis://cams:{x}", fps=5, max_frames=3)
        await until_status(client, job_id, "running")
        await asyncio.sleep(0.3)
        ts = int(time.time() * 1000)  # a frame per 200 ms of capture time: each one is sampled
        sync_redis.xadd("cams:{x}", {"image": b"junk", "ts": ts})
        for i in range(4):
            sync_redis.xadd("cams:{x}", {"image": encode(gradient), "meta": json.dumps({"i": i}),
                                         "ts": ts + 200 * (i + 1)})
        job = await until_status(client, job_id, "completed")
        assert job["counts"]["processed"] == 2 and job["counts"]["dead_lettered"] == 1
        results = (await (await client.get(f"/jobs/{job_id}/results")).json())["results"]
        assert [r["fields"]["meta"] for r in results] == [{"i": 0}, {"i": 1}]
        (dead,) = sync_redis.xrange(keys.job_deadletter(job_id))
        assert dead[1][b"reason"] == b"unsupported_format"


async def test_a_redis_stream_job_samples_frames_whose_ts_come_out_of_order_once_per_bucket(
        redis_url, sync_redis, tmp_path, videos, gradient):
    """Pairwise swapped capture times (two producers on one stream): the job compared each
    frame with the last one taken only, and took twice its fps (16 of 40 at fps 2 over 4 s)."""
    async with serving(job_settings(redis_url, tmp_path, videos)) as (d, client):
        job_id = await submit(client, source="redis://cams:{swapped}", fps=2, max_frames=100)
        await until_status(client, job_id, "running")
        await asyncio.sleep(0.3)
        ts = (int(time.time() * 1000) // 1000 + 1) * 1000  # on a second: 2 buckets per second
        order = [ts + 100 * (i + 1 if i % 2 == 0 else i - 1) for i in range(40)]  # 4 s, swapped pairs
        for t in order:
            sync_redis.xadd("cams:{swapped}", {"image": encode(gradient), "ts": t})
        for _ in range(100):  # counts are written every half second
            if (await (await client.get(f"/jobs/{job_id}")).json())["counts"]["decoded"] == 40:
                break
            await asyncio.sleep(0.1)
        await client.delete(f"/jobs/{job_id}")
        job = await until_status(client, job_id, "cancelled")
        assert job["counts"]["sampled"] == 8, job["counts"]


async def test_a_job_lease_found_lost_by_a_write_is_logged_and_counted_once(redis_url, sync_redis, tmp_path,
                                                                            videos, gradient):
    """A busy job's fenced write finds a lost lease before the renewal does (here, a renewal
    every 20 s): that loss was logged as a plain job_stopped and never counted, so the alert
    on sightstream_leases_lost_total{kind="job"} could not fire."""
    settings = job_settings(redis_url, tmp_path, videos, lease_ttl_ms=60_000)
    async with serving(settings) as (d, client):
        lost = d.metrics.leases_lost.labels("job")
        job_id = await submit(client, source="redis://cams:{stolen}")
        await until_status(client, job_id, "running")
        await asyncio.sleep(0.3)
        sync_redis.xadd("cams:{stolen}", {"image": encode(gradient)})
        await wait_for_results(client, job_id, 1)
        sync_redis.set(keys.job_lease(job_id), "another-daemon", px=30_000)
        with capture_logs() as logs:
            for _ in range(3):  # each write after the first finds the lease lost again
                sync_redis.xadd("cams:{stolen}", {"image": encode(gradient)})
                await asyncio.sleep(0.2)
            await wait_for(lambda: lost._value.get() >= 1, 10, "the lost lease counted")
            await asyncio.sleep(0.5)
        assert lost._value.get() == 1
        (line,) = [e for e in logs if e["event"] == "job_lease_lost"]
        assert line["job"] == job_id and "another daemon holds it" in line["reason"]
        assert job_id not in d.job_runner.running  # it stopped here


async def test_a_stream_job_ends_at_max_frames_with_no_further_entry(redis_url, sync_redis, tmp_path, videos,
                                                                     gradient):
    async with serving(job_settings(redis_url, tmp_path, videos)) as (d, client):
        job_id = await submit(client, source="redis://cams:{q}", fps=5, max_frames=1)
        await until_status(client, job_id, "running")
        await asyncio.sleep(0.3)
        sync_redis.xadd("cams:{q}", {"image": encode(gradient)})  # the only one: the stream stays quiet
        job = await until_status(client, job_id, "completed", timeout=5)
        assert job["counts"]["processed"] == 1 and job["progress"]["fraction"] is None


async def test_a_stream_job_resumed_at_its_frame_limit_ends_without_reading(redis_url, sync_redis, tmp_path,
                                                                            videos):
    """Its daemon died after the last frame's result and before the job was marked complete:
    the daemon that resumes it must not wait for an entry a quiet stream never sends."""
    client = make_client(redis_url)
    try:
        job = await JobStore(client, 60).create(JobSpec("redis://cams:{r}", "tiny/det", max_frames=1))
        sync_redis.hset(keys.job(job.id), "last_seq", 1)  # its one frame was published
    finally:
        await client.aclose(close_connection_pool=True)
    async with serving(job_settings(redis_url, tmp_path, videos)) as (d, client):
        done = await until_status(client, job.id, "completed", timeout=10)
        assert done["counts"]["processed"] == 0  # this attempt read nothing


async def test_a_restarted_daemon_resumes_its_own_jobs_at_once_and_first(redis_url, sync_redis, tmp_path, videos):
    """Killed (kill -9) and restarted under the same consumer name, a daemon waited out its
    old jobs' leases while newer pending jobs took its slots: the old ones showed `running`,
    frozen, for as long as those ran."""
    client = make_client(redis_url)
    try:
        store = JobStore(client, 60)
        old = await store.create(JobSpec("redis://cams:{old}", "tiny/det"))
        await asyncio.sleep(0.005)  # ids sort by their millisecond, then at random
        newer = await store.create(JobSpec("redis://cams:{newer}", "tiny/det"))
    finally:
        await client.aclose(close_connection_pool=True)
    # as the killed process left it: running, its lease still live for a minute, and its
    # consumer name's lease too (naming a process that is gone)
    sync_redis.hset(keys.job(old.id), mapping={"status": "running", "holder": "a:0", "attempt": 1})
    sync_redis.set(keys.job_lease(old.id), "the killed process's token", px=60_000)
    sync_redis.set(keys.consumer_slot("a", 0), f"{crashed_process()}#0123456789abcdef", px=60_000)
    settings = job_settings(redis_url, tmp_path, videos, max_concurrent=1)
    async with serving(settings, host="a") as (d, client):
        assert d.consumer == "a:0"
        await wait_for(lambda: old.id in d.job_runner.running, 5, "the old job resumed here")
        job = await until_status(client, old.id, "running", timeout=10)
        assert job["attempt"] == 2 and job["holder"] == "a:0"
        assert (await (await client.get(f"/jobs/{newer.id}")).json())["status"] == "pending"


async def test_a_daemon_that_did_not_take_its_name_from_a_crash_leaves_jobs_of_that_name_alone(
        redis_url, sync_redis, tmp_path, videos):
    """A job `running` under this name may be a live daemon's that was renamed since, or one
    another daemon just took (its lease set, START not yet run): its lease is not freed."""
    client = make_client(redis_url)
    try:
        job = await JobStore(client, 60).create(JobSpec("redis://cams:{theirs}", "tiny/det"))
    finally:
        await client.aclose(close_connection_pool=True)
    sync_redis.hset(keys.job(job.id), mapping={"status": "running", "holder": "a:0", "attempt": 1})
    sync_redis.set(keys.job_lease(job.id), "a live daemon's token", px=60_000)
    async with serving(job_settings(redis_url, tmp_path, videos), host="a") as (d, client):
        assert d.consumer == "a:0"
        await asyncio.sleep(1)
        assert job.id not in d.job_runner.running
    assert sync_redis.get(keys.job_lease(job.id)) == b"a live daemon's token"


async def test_a_running_job_whose_daemon_died_shows_pending_while_every_daemon_is_busy(
        redis_url, sync_redis, tmp_path, videos):
    client = make_client(redis_url)
    try:
        store = JobStore(client, 60)
        busy = await store.create(JobSpec("redis://cams:{busy}", "tiny/det"))  # older: taken first, runs on
        await asyncio.sleep(0.005)  # ids sort by their millisecond, then at random
        orphan = await store.create(JobSpec("redis://cams:{orphan}", "tiny/det"))
    finally:
        await client.aclose(close_connection_pool=True)
    # a dead daemon's job: running, its lease lapsed
    sync_redis.hset(keys.job(orphan.id), mapping={"status": "running", "holder": "gone:0", "attempt": 1})
    async with serving(job_settings(redis_url, tmp_path, videos, max_concurrent=1)) as (d, client):
        await until_status(client, busy.id, "running")
        job = await until_status(client, orphan.id, "pending", timeout=10)
        assert job["holder"] == "" and orphan.id not in d.job_runner.running


async def test_a_job_says_how_much_of_its_video_was_skipped(redis_url, tmp_path, videos):
    playlist = hls.make_hls_vod(tmp_path / "gappy", seconds=4, fps=10)
    (tmp_path / "gappy" / "index1.ts").unlink()  # 1 s to 2 s
    settings = job_settings(redis_url, tmp_path, videos)
    settings.jobs.allowed_paths.append(str(tmp_path))
    async with serving(settings) as (d, client):
        job = await until_status(client, await submit(client, source=f"file://{playlist}", fps=2), "completed")
        whole = await until_status(client, await submit(client, source=f"file://{videos}/clip.mp4", fps=2),
                                   "completed")
    assert job["progress"]["skipped_s"] == pytest.approx(1.0, abs=0.15)
    assert job["progress"]["last_error"].startswith("the video skips from 1.0 s to 2.0 s")
    assert whole["progress"]["skipped_s"] == 0


async def test_a_resumed_job_that_reads_no_new_frame_keeps_its_position(redis_url, sync_redis, tmp_path, videos):
    """Its daemon died after the last result: the attempt that finished it said position null."""
    client = make_client(redis_url)
    try:
        job = await JobStore(client, 60).create(JobSpec(f"file://{videos}/clip.mp4", "tiny/det", fps=2))
    finally:
        await client.aclose(close_connection_pool=True)
    sync_redis.hset(keys.job(job.id), mapping={  # as the first attempt left it: every frame published
        "attempt": 1, "last_seq": 6, "last_position": "2.5",
        "progress": json.dumps({"position_s": 2.5, "duration_s": 3.0, "fraction": 0.8333})})
    async with serving(job_settings(redis_url, tmp_path, videos)) as (d, client):
        done = await until_status(client, job.id, "completed")
    assert done["attempt"] == 2 and done["counts"]["processed"] == 0
    assert done["progress"]["position_s"] == 2.5 and done["progress"]["fraction"] == 1.0


async def test_expired_jobs_leave_the_index_without_anyone_listing_them(redis_url, sync_redis):
    """Listing dropped expired ids only from the pages it read: on a daemon nobody lists in
    full, the index kept every job id ever made."""
    client = make_client(redis_url)
    store = JobStore(client, 60)
    try:
        made = [await store.create(JobSpec(f"redis://cams:{{{n}}}", "tiny/det")) for n in range(5)]
        jobs = sorted(made, key=lambda job: job.id)  # by time, then at random within a millisecond
        for job in jobs[:3]:  # the oldest three expired
            sync_redis.delete(keys.job(job.id))
        assert await store.prune_index(page=2) == 3
        assert [m.decode() for m in sync_redis.zrange(keys.JOBS_INDEX, 0, -1)] == [j.id for j in jobs[3:]]
        assert await store.prune_index(page=2) == 0
    finally:
        await client.aclose(close_connection_pool=True)


async def test_writes_are_fenced_by_the_lease(redis_url, sync_redis):
    client = make_client(redis_url)
    store = JobStore(client, 60)
    try:
        job = await store.create(JobSpec("redis://cams:{x}", "tiny/det"))
        ours = Lease(client, keys.job_lease(job.id), 60_000)
        assert await ours.acquire()
        assert (await store.start(job.id, ours.token, "a"))[0]

        async def publish(token, seq):
            def fill(pipe):
                store.queue_publish(pipe, job.id, token, seq, str(seq), keys.job_results(job.id), 0, "processed",
                                    {"frame_id": str(seq)})
            return (await run_pipelined(client, fill, store.publish_script))[0]

        assert await publish(ours.token, 1) == 1
        assert await publish(ours.token, 1) == 0  # at the checkpoint: never twice
        sync_redis.delete(keys.job_lease(job.id))  # our lease expired while we were paused …
        theirs = Lease(client, keys.job_lease(job.id), 60_000)
        assert await theirs.acquire()  # … and another daemon took the job
        assert await publish(ours.token, 2) == -1
        assert await store.progress(job.id, ours.token, {"counts": "{}"}) == -1
        assert not await store.finish(job, ours.token, "completed")
        assert not await ours.renew()
        assert sync_redis.xlen(keys.job_results(job.id)) == 1
        assert await publish(theirs.token, 2) == 1
        assert await store.cancel(job.id) == "running"
        assert await publish(theirs.token, 3) == -2  # cancelled: not running any more
    finally:
        await client.aclose(close_connection_pool=True)


async def test_a_busy_job_does_not_starve_the_pipelines(redis_url, sync_redis, tmp_path, videos, gradient):
    settings = job_settings(redis_url, tmp_path, videos, max_in_flight=8, batch_size=4)
    settings = settings.model_copy(update={"pipelines": [
        settings.pipelines[0].model_copy(update={"model": "fake/slow", "batch_size": 4})]})
    settings.models["fake"] = {"slow": type(settings.models["tiny"]["det"])(
        backend="torch", task="detect", adapter="tests.fake_adapters:Scripted", delay_s=0.1)}
    hls.make_clip(tmp_path / "long.mp4", seconds=20, fps=10)
    settings.jobs.allowed_paths.append(str(tmp_path))
    async with serving(settings) as (d, client):
        job_id = await submit(client, source=f"file://{tmp_path}/long.mp4", fps=10, model="fake/slow")
        await wait_for_results(client, job_id, 8)  # the job keeps the device busy (200 frames)
        for _ in range(8):
            sync_redis.xadd("frames:{p}", {"image": encode(gradient)})
        await wait_for(lambda: sync_redis.xlen("results:people:frames:{p}") == 8, 10, "the pipeline's results")
        job = await (await client.get(f"/jobs/{job_id}")).json()
        assert job["status"] == "running" and job["counts"]["processed"] < 150  # served alongside the job


async def test_a_submission_retried_with_its_idempotency_key_makes_one_job(redis_url, sync_redis, tmp_path,
                                                                          videos, monkeypatch):
    """A client that lost the answer to its POST sends it again with the same Idempotency-Key:
    it gets the job the first try made (200, Idempotent-Replayed), never a second job."""
    from sightstream.jobs import store

    body = {"model": "tiny/det", "source": f"file://{videos}/clip.mp4", "fps": 5, "max_frames": 2}
    async with serving(job_settings(redis_url, tmp_path, videos)) as (d, client):
        first = await client.post("/jobs", json=body, headers={"Idempotency-Key": "k-1"})
        again = await client.post("/jobs", json=body, headers={"Idempotency-Key": "k-1"})
        assert (first.status, again.status) == (201, 200)
        job_id = (await first.json())["job_id"]
        assert (await again.json())["job_id"] == job_id and again.headers["Idempotent-Replayed"] == "true"
        assert again.headers["Location"] == f"/jobs/{job_id}"
        other = await client.post("/jobs", json={**body, "fps": 2}, headers={"Idempotency-Key": "k-1"})
        assert other.status == 409 and "another request" in (await other.json())["error"]["message"]
        fresh = await client.post("/jobs", json=body, headers={"Idempotency-Key": "k-2"})
        assert fresh.status == 201 and (await fresh.json())["job_id"] != job_id
        assert (await client.post("/jobs", json=body, headers={"Idempotency-Key": ""})).status == 422
        listed = await (await client.get("/jobs")).json()
        assert len(listed["jobs"]) == 2

        # A key claimed by a request that died before writing its job: a retry waits a moment,
        # then makes the job itself.
        monkeypatch.setattr(store, "CLAIM_WAIT_S", 0.2)
        import hashlib

        raw = json.dumps(body).encode()
        digest = hashlib.sha256(raw).hexdigest()[:32]
        claimed = "0123456789abcdef0123"
        sync_redis.set(keys.job_submission("\0k-3"), f"{claimed} {digest}")  # no token: who is ""
        taken = await client.post("/jobs", data=raw, headers={"Idempotency-Key": "k-3",
                                                               "Content-Type": "application/json"})
        assert taken.status == 201 and (await taken.json())["job_id"] == claimed  # the claimed id

        # Two tries at once, the first slow to write its job: both answer the one job.
        real = store.JobStore._write

        async def slow(self, spec, job_id):
            await asyncio.sleep(0.5)
            return await real(self, spec, job_id)

        monkeypatch.setattr(store.JobStore, "_write", slow)
        both = await asyncio.gather(*(client.post("/jobs", json=body, headers={"Idempotency-Key": "k-4"})
                                      for _ in range(2)))
        ids = {(await r.json())["job_id"] for r in both}
        assert len(ids) == 1 and sorted(r.status for r in both) == [200, 201]
        assert len((await (await client.get("/jobs")).json())["jobs"]) == 4


async def test_a_jobs_frames_queued_behind_another_models_stuck_call_are_sent_again(redis_url, tmp_path, videos):
    """Another user's stuck model (its call abandoned past its timeout) used to dead-letter this
    job's frames queued behind it, model_timeout, for good: they never reached their model."""
    settings = job_settings(redis_url, tmp_path, videos).model_copy(deep=True)
    settings.models["fake"] = {"hang": ModelEntry(**fake_entry(hang_first_s=3, timeout_s=1))}
    with capture_logs() as logged:
        async with serving(settings) as (d, client):
            stuck = await submit(client, source=f"file://{videos}/clip.mp4", model="fake/hang", fps=1, max_frames=1)
            await until_status(client, stuck, "running")
            await asyncio.sleep(0.3)  # its first call is on the device thread now, for 3 s
            healthy = await submit(client, source=f"file://{videos}/clip.mp4", fps=5)
            job = await until_status(client, healthy, "completed", "failed")
            assert job["status"] == "completed" and job["counts"]["dead_lettered"] == 0, job
            assert job["counts"]["processed"] == 15
            assert (await until_status(client, stuck, "completed"))["counts"]["dead_lettered"] == 1  # its own
    assert any(e["event"] == "job_frame_sent_again" and e["job"] == healthy for e in logged)


async def test_a_daemon_that_cannot_run_a_job_leaves_it_to_one_that_can(redis_url, tmp_path, videos):
    """A rolling config change, or a fleet where only some hosts have a model or a folder: a
    daemon whose config lacks the job's model, or does not allow its file, took the job and
    hung it (an unknown model) or failed it (a path not allowed). It leaves it now, saying why."""
    full = job_settings(redis_url, tmp_path, videos, max_concurrent=1).model_copy(deep=True)
    full.models["fake"] = {"slow": ModelEntry(**fake_entry(delay_s=0.05))}
    bare = settings_for(redis_url, tmp_path, jobs={"poll_s": 0.2, "lease_ttl_ms": 2000})  # no fake/slow, no paths
    async with serving(bare, host="bare") as (_, bare_client), serving(full, host="full") as (_, client):
        jobs = [await submit(client, source=f"file://{videos}/clip.mp4", fps=5, model=model)
                for model in ("fake/slow", "tiny/det", "fake/slow")]
        # one runs on "full" (max_concurrent 1); "bare" has looked at the others and left them
        waiting = await until_status(bare_client, jobs[2], "pending")
        for _ in range(50):
            if waiting.get("waiting"):
                break
            await asyncio.sleep(0.1)
            waiting = await (await bare_client.get(f"/jobs/{jobs[2]}")).json()
        assert waiting["status"] == "pending" and waiting["waiting"].startswith("bare:0 cannot run it: ")
        done = [await until_status(client, job_id, "completed", "failed", timeout=60) for job_id in jobs]
    assert [(job["status"], job["holder"]) for job in done] == [("completed", "full:0")] * 3
    assert all(job["waiting"] is None and job["counts"]["processed"] == 15 for job in done)


async def test_a_running_job_whose_daemon_is_gone_is_not_left_running(redis_url, tmp_path, videos):
    """Its daemon stopped; the one left cannot run it. It stayed `running`, holder the gone
    daemon, for ever: the one left took its lease, saw it could not run it, and left it as it was."""
    full = job_settings(redis_url, tmp_path, videos).model_copy(deep=True)
    full.models["fake"] = {"slow": ModelEntry(**fake_entry(delay_s=0.05))}
    bare = settings_for(redis_url, tmp_path, jobs={"poll_s": 0.2, "lease_ttl_ms": 2000})
    async with serving(bare, host="bare") as (bare_daemon, client):
        async with serving(full, host="full") as (_, full_client):
            job_id = await submit(full_client, source="redis://cams:{gone}", model="fake/slow")
            assert (await until_status(client, job_id, "running"))["holder"] == "full:0"
            # as when "bare" took the lease first, while the job was pending, and left it: a
            # refusal it remembers for a while must not hold it back once the job is orphaned
            bare_daemon.job_runner._cannot[job_id] = (time.monotonic(), "unknown model 'fake/slow'", 0)
        # "full" stopped (the job is pending again, run once since the refusal): "bare" is the
        # only daemon, and cannot run it
        failed = await until_status(client, job_id, "failed", timeout=20)
    assert "unknown model 'fake/slow'" in failed["error"]


@pytest.mark.parametrize("daemons", [1, 2])
async def test_a_job_no_daemon_can_run_fails_saying_why(redis_url, tmp_path, daemons):
    """Once every daemon on the Redis has said it cannot run a job (its model is in no config),
    the job fails with the reason rather than waiting for nobody."""
    settings = settings_for(redis_url, tmp_path, jobs={"poll_s": 0.2})
    async with contextlib.AsyncExitStack() as stack:
        d, client = await stack.enter_async_context(serving(settings, host="one"))
        if daemons == 2:
            await stack.enter_async_context(serving(settings, host="two"))
        job = await d.jobs.create(JobSpec("redis://cams:{x}", "gone/model"))
        failed = await until_status(client, job.id, "failed", timeout=20)
    assert "unknown model 'gone/model'" in failed["error"]


async def test_a_failed_job_says_what_it_read_before_it_failed(redis_url, tmp_path, videos):
    """Its counts and position were left as the last periodic write had them (0 decoded)."""
    whole = hls._encode(videos / "whole.mp4", 4, 10, hls.SIZE, None, fmt="mp4", options={"movflags": "+faststart"})
    (videos / "cut.mp4").write_bytes(whole.read_bytes()[:len(whole.read_bytes()) // 2])
    async with serving(job_settings(redis_url, tmp_path, videos)) as (d, client):
        job_id = await submit(client, source=f"file://{videos}/cut.mp4", fps=10)
        job = await until_status(client, job_id, "failed")
    assert "cut short" in job["error"]
    counts = job["counts"]
    assert counts["processed"] > 5 and counts["decoded"] >= counts["sampled"] >= counts["processed"]
    assert job["progress"]["position_s"] > 0.5


async def test_a_job_ends_even_if_its_watch_loses_a_cancel(redis_url, tmp_path, videos, monkeypatch):
    """A cancel that lands in a Redis call can be lost; the job's watch (progress every half
    second) then went on for ever, and its finished job stayed `running`."""
    write = JobStore.progress

    async def losing_cancels(self, *args, **kwargs):
        if asyncio.current_task().get_name().startswith("job-watch"):
            try:
                await asyncio.sleep(0.45)  # a slow round trip: the run's end cancels it here
            except asyncio.CancelledError:
                pass  # as a library that loses it
        return await write(self, *args, **kwargs)

    monkeypatch.setattr(JobStore, "progress", losing_cancels)
    settings = job_settings(redis_url, tmp_path, videos).model_copy(deep=True)
    settings.models["fake"] = {"slow": ModelEntry(**fake_entry(delay_s=0.1))}  # a run of a few watches
    async with serving(settings) as (d, client):
        job_id = await submit(client, source=f"file://{videos}/clip.mp4", fps=10, model="fake/slow")
        assert (await until_status(client, job_id, "completed", "failed", timeout=20))["status"] == "completed"
