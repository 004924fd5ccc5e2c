"""A job whose daemon is killed -9 mid-video is taken over by another daemon and resumed from
its checkpoint: every frame reported once, none missing."""

from __future__ import annotations

import json
import math
import os
import signal
import urllib.request

import pytest

from sightstream import keys
from tests import hls
from tests.e2e.daemons import Daemon, wait_until

pytestmark = pytest.mark.e2e


def post(d: Daemon, path: str, body: dict) -> dict:
    request = urllib.request.Request(d.url(path), data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as r:
        return json.loads(r.read())


def test_a_job_resumes_on_another_daemon_after_kill_9(tmp_path, redis_url, sync_redis):
    clip = hls.make_clip(tmp_path / "clip.mp4", seconds=10, fps=10)  # 40 results at 4 fps
    config = dict(
        fake="delay_s = 0.15",
        tables=f'[jobs]\nallowed_paths = ["{tmp_path}"]\nlease_ttl_ms = 2000\npoll_s = 0.2\nbatch_size = 1\n'
               "max_in_flight = 4\n",
    )
    first = Daemon(tmp_path, redis_url, name="first", **config)
    second = None
    try:
        first.wait_ready()
        job_id = post(first, "/jobs", {"source": f"file://{clip}", "model": "fake/slow", "fps": 4})["job_id"]
        results = keys.job_results(job_id)
        wait_until(lambda: sync_redis.xlen(results) >= 8, 60, "the first results")
        os.kill(first.proc.pid, signal.SIGKILL)  # mid-video, with frames in flight
        first.proc.wait()
        killed_at = sync_redis.xlen(results)
        assert killed_at < 40

        second = Daemon(tmp_path, redis_url, name="second", **config)
        second.wait_ready()
        wait_until(lambda: second.get(f"/jobs/{job_id}")[1]["status"] == "completed", 90, "the job to complete")
        status, job = second.get(f"/jobs/{job_id}")
        assert job["attempt"] == 2 and job["holder"] != "" and job["error"] == ""
        frames = [int(f[b"frame_id"]) for _, f in sync_redis.xrange(results)]
        assert len(frames) == len(set(frames)) == 40  # none twice, none missing
        # the first frame of each quarter second: frame ceil(k * 2.5) of the 10 fps clip
        assert frames == [math.ceil(k * 2.5) for k in range(40)]
        assert job["counts"]["processed"] == 40
    finally:
        first.close()
        if second:
            second.close()
