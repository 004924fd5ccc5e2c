"""Start-up without Redis, and overload: producers far faster than the model."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import psutil
import pytest
import redis

from sightstream.daemon.embedded_redis import EmbeddedRedis, free_port
from tests.conftest import encode
from tests.e2e.daemons import Daemon, wait_until
from tests.integration.helpers import entries

pytestmark = pytest.mark.e2e


def test_an_unreachable_redis_at_start_is_retried_not_fatal(tmp_path, gradient):
    port = free_port()
    d = Daemon(tmp_path, f"redis://127.0.0.1:{port}/0")
    try:
        wait_until(lambda: _answers(d), 60, "the control plane")
        wait_until(lambda: '"op": "start"' in d.output(), 30, "a failed try at Redis logged")
        assert d.proc.poll() is None  # still running
        assert d.get("/health/ready")[0] == 503
        with EmbeddedRedis(port=port) as server:
            d.wait_ready(30)
            client = redis.Redis.from_url(server.url)
            client.xadd("frames:{late}", {"image": encode(gradient)})
            wait_until(lambda: client.xlen("results:people:frames:{late}") == 1, 30, "a result")
            client.close()
        assert '"event": "redis_unreachable"' in d.output() and '"op": "start"' in d.output()
    finally:
        d.close()


def _answers(d: Daemon) -> bool:
    try:
        d.get("/health/live")
        return True
    except OSError:
        return False


class Producer(threading.Thread):
    """XADDs frames at `rate` per second until stopped, each with its capture ts."""

    def __init__(self, url: str, frame: bytes, rate: float, streams: list[str]) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(url)
        self.frame, self.rate, self.streams = frame, rate, streams
        self.sent = 0
        self.halt = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        while not self.halt.is_set():
            due = int((time.monotonic() - started) * self.rate)
            pipe = self.client.pipeline(transaction=False)
            for i in range(self.sent, due):
                pipe.xadd(self.streams[i % len(self.streams)],
                          {"image": self.frame, "ts": str(time.time_ns() // 1_000_000)})
            pipe.execute()
            self.sent = max(self.sent, due)
            time.sleep(0.02)
        self.client.close()


def noisy_jpeg() -> bytes:
    rng = np.random.default_rng(1)
    return encode(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8), quality=80)  # ~50 KB


def test_overload_keeps_the_backlog_in_redis_and_memory_flat(tmp_path, redis_url, sync_redis):
    # The model takes 4 frames per 0.2 s (20 frames/s); producers send 200 frames/s.
    d = Daemon(tmp_path, redis_url, pipeline="model = \"fake/slow\"\nbatch_size = 4\nmax_in_flight = 16",
               fake="delay_s = 0.2")
    producer = Producer(redis_url, noisy_jpeg(), 200, ["frames:{o1}", "frames:{o2}"])
    try:
        d.wait_ready()
        process = psutil.Process(d.proc.pid)
        producer.start()
        # Warm up: the model loaded and running, the daemon's in-flight places all taken.
        wait_until(lambda: sync_redis.xlen("results:people:frames:{o1}") >= 4
                   and sum(sync_redis.xpending(s, "people")["pending"] for s in ("frames:{o1}", "frames:{o2}")) >= 12,
                   30, "the daemon busy with a full in-flight window")
        samples = []
        for _ in range(16):
            samples.append(process.memory_info().rss)
            pending = sum(sync_redis.xpending(s, "people")["pending"] for s in ("frames:{o1}", "frames:{o2}"))
            assert pending <= 16  # the daemon holds at most max_in_flight frames
            time.sleep(0.5)
        producer.halt.set()
        producer.join()
        done = sum(sync_redis.xlen(f"results:people:{s}") for s in ("frames:{o1}", "frames:{o2}"))
        assert producer.sent > 5 * done  # the backlog waits in Redis
        growth = max(samples) - samples[0]
        assert growth < 40 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB under overload"
    finally:
        producer.halt.set()
        d.close()


def test_live_mode_bounds_latency_under_overload(tmp_path, redis_url, sync_redis):
    max_age_ms, batch_s = 1000, 0.2
    d = Daemon(tmp_path, redis_url,
               pipeline=f"model = \"fake/slow\"\nbatch_size = 4\nmax_in_flight = 16\nmax_age_ms = {max_age_ms}",
               fake=f"delay_s = {batch_s}")
    producer = Producer(redis_url, noisy_jpeg(), 200, ["frames:{live}"])
    try:
        d.wait_ready()
        producer.start()
        time.sleep(8)
        producer.halt.set()
        producer.join()
        wait_until(lambda: sync_redis.xpending("frames:{live}", "people")["pending"] == 0
                   and sync_redis.xinfo_groups("frames:{live}")[0]["lag"] == 0, 30,
                   "the backlog handled (published or dropped as stale)")
        results = entries(sync_redis, "results:people:frames:{live}")
        latencies = sorted(int(f["latency_ms"]) for _, f in results)
        assert len(latencies) > 20
        p99 = latencies[int(0.99 * (len(latencies) - 1))]
        assert p99 <= max_age_ms + batch_s * 1000 + 300, f"p99 {p99} ms"
        metrics = _metrics(d)
        assert 'reason="stale"' in metrics
        dropped = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                      if line.startswith("sightstream_frames_acked_without_result_total") and "stale" in line)
        assert dropped > 0
        assert json.loads(results[0][1]["result"])["detections"] == []
    finally:
        producer.halt.set()
        d.close()


def _metrics(d: Daemon) -> str:
    import urllib.request

    with urllib.request.urlopen(d.url("/metrics"), timeout=2) as r:
        return r.read().decode()
