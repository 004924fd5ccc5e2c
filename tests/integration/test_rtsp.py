"""RTSP cameras, read directly (no publisher in between): a tiny camera made in the tests
(tests/rtsp.py) streams H.264 over RTSP/TCP. Frames go on across a camera reboot, whose new
session's timestamps start again; a job and a pipeline take rtsp:// sources."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from sightstream.config import JobSettings
from sightstream.jobs.sources import SourceRefused, check_source
from sightstream.stages.video_reader import ReaderOptions, VideoSource, container_options
from tests.integration.helpers import serving, settings_for, wait_for
from tests.rtsp import rtsp_camera

pytestmark = pytest.mark.integration


async def test_frames_go_on_after_the_camera_reboots():
    """A reboot cuts the session; the reader opens a new one, whose timestamps start again at
    0: its frames come after the last one's, with increasing indices, none dropped as old."""
    with rtsp_camera(seconds=2, fps=10) as camera:
        source = VideoSource(camera.url(), ReaderOptions(fps=0, read_timeout_s=2, open_timeout_s=5))
        frames = []

        async def collect():
            async with contextlib.aclosing(source.frames()) as stream:
                async for frame in stream:
                    frames.append(frame)
                    if len(frames) == 15:
                        camera.drop()
                    if len(frames) == 35:
                        return

        await asyncio.wait_for(collect(), 30)
        source.stop()
    assert camera.sessions >= 2
    assert all(a.index < b.index and a.pts_s < b.pts_s for a, b in zip(frames, frames[1:]))
    assert frames[0].image.shape == (240, 320, 3)
    assert frames[-1].pts_s < 8  # about 3.5 s of frames and a reconnect: no index jumped ahead


def test_rtsp_sources_are_checked_like_http_ones():
    assert container_options("rtsp://cam.local/stream1", ReaderOptions()) == {"rtsp_transport": "tcp"}
    allowed = JobSettings(allowed_hosts=["*.cams.example"])
    assert check_source("rtsp://user:pw@door.cams.example:554/h264", allowed).kind == "video"
    with pytest.raises(SourceRefused, match="host evil.example is not in jobs.allowed_hosts"):
        check_source("rtsps://evil.example/live", allowed)
    with pytest.raises(SourceRefused, match="names no host"):
        check_source("rtsp:///live", JobSettings())


async def test_a_job_and_a_pipeline_read_an_rtsp_camera(redis_url, sync_redis, tmp_path):
    """The cameras' URLs carry a password: it opens them, and is shown nowhere else (result
    stream names, results' `source`, the jobs and pipelines APIs)."""
    with rtsp_camera(seconds=2, fps=10) as camera:
        url = camera.url(user="viewer:s3cret")
        settings = settings_for(redis_url, tmp_path, [{"input": ["frames:*", url], "fps": 2}],
                                jobs={"poll_s": 0.2})
        async with serving(settings) as (d, client):
            r = await client.post("/jobs", json={"model": "tiny/det", "source": camera.url("job", "viewer:s3cret"),
                                                 "fps": 5, "max_frames": 6})
            assert r.status == 201, await r.text()
            job_id = (await r.json())["job_id"]

            async def status():
                return (await (await client.get(f"/jobs/{job_id}")).json())["status"]

            deadline = asyncio.get_running_loop().time() + 30
            while (s := await status()) != "completed":
                assert s in ("pending", "running") and asyncio.get_running_loop().time() < deadline, s
                await asyncio.sleep(0.2)
            job = await (await client.get(f"/jobs/{job_id}")).json()
            assert job["source"] == camera.url("job")
            assert sync_redis.xlen(f"results:job:{{{job_id}}}") == 6
            (camera_input,) = (await (await client.get("/pipelines/people")).json())["videos"]
            results = camera_input["results_stream"]
            assert camera_input["url"] == camera.url() and results == f"results:people:{camera.url()}"
            for path in ("/pipelines/people", "/pipelines", "/health"):
                assert "s3cret" not in await (await client.get(path)).text(), path
            await wait_for(lambda: sync_redis.exists(results) and sync_redis.xlen(results) >= 3, 30,
                           "the camera's results")
    for key in sync_redis.keys("results:*"):
        assert b"s3cret" not in key
        assert all(b"s3cret" not in fields[b"source"] for _, fields in sync_redis.xrange(key))


class _Decoded:
    """What _Reader._frame reads of a decoded frame."""

    def __init__(self, pts: int) -> None:
        self.pts, self.key_frame, self.rotation, self.side_data = pts, True, 0, ()

    def to_ndarray(self, format: str):
        import numpy as np

        return np.zeros((2, 2, 3), np.uint8)


def _camera_reader(fps: float, after_s: float | None = None):
    import threading
    from fractions import Fraction

    from sightstream.stages.video_reader import ReaderStats, _Reader

    kept = []
    reader = _Reader("rtsp://cam.local/stream1", ReaderOptions(fps=fps), ReaderStats(), threading.Event(),
                     lambda frame: kept.append(frame) or True)
    reader.stats.is_live, reader.rate, reader.t0 = True, 10.0, 0.0
    if after_s is not None:
        reader.last_pts, reader.last_bucket = after_s, reader._bucket(after_s)

    def session(seconds: float) -> None:  # a new session: its timestamps start at 0 again
        reader.progressed = False
        for k in range(int(seconds * 10)):
            reader._frame(_Decoded(k), Fraction(1, 10))

    return reader, kept, session


def test_a_reboot_at_a_low_fps_loses_no_sampling_period():
    """fps 0.1: a result every 10 s. After a reboot 20 s in, the new session goes on from the
    last frame decoded (19.9 s), not the last kept (10 s): its first frame is in a new period."""
    reader, kept, session = _camera_reader(fps=0.1)
    session(20)
    session(1)
    assert [round(f.pts_s, 1) for f in kept] == [0.0, 10.0, 20.0]
    assert [f.index for f in kept] == sorted({f.index for f in kept})


def test_a_camera_resumed_at_0_s_by_another_daemon_goes_on_after_it():
    reader, kept, session = _camera_reader(fps=0, after_s=0.0)
    session(0.5)
    assert [round(f.pts_s, 1) for f in kept] == [0.1, 0.2, 0.3, 0.4, 0.5]
