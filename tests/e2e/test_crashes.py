"""Crashes and signals with real daemon subprocesses: kill -9, SIGTERM, a second signal."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.conftest import encode
from tests.e2e.daemons import Daemon, wait_until
from tests.integration.helpers import entries

pytestmark = pytest.mark.e2e
STREAMS = ["frames:{a}", "frames:{b}", "frames:{c}"]


def outcomes(sync_redis) -> list[tuple[str, str]]:
    """(source, frame_id) of every result and dead-letter entry."""
    out = []
    for stream in STREAMS:
        for key in (f"results:people:{stream}", f"deadletter:people:{stream}"):
            out += [(f["source"].decode(), f["frame_id"].decode()) for _, f in entries(sync_redis, key)]
    return out


@pytest.fixture
def daemons(tmp_path):
    started: list[Daemon] = []

    def start(redis_url: str, **config: str) -> Daemon:
        d = Daemon(tmp_path, redis_url, name=f"d{len(started)}", **config)
        started.append(d)
        return d

    yield start
    for d in started:
        d.close()


def test_a_daemon_killed_mid_batch_loses_no_frame_and_doubles_none(daemons, redis_url, sync_redis, gradient):
    jpeg = encode(gradient)
    sent = set()
    for i in range(330):
        stream = STREAMS[i % 3]
        sent.add((stream, sync_redis.xadd(stream, {"image": jpeg}).decode()))
    config = dict(pipeline="model = \"fake/slow\"\nbatch_size = 4\nmax_in_flight = 16",
                  fake="delay_s = 0.2")
    group = [daemons(redis_url, **config) for _ in range(3)]
    for d in group:
        d.wait_ready()
    wait_until(lambda: len(outcomes(sync_redis)) >= 60, 60, "some results")
    victim = group[1]
    assert sync_redis.xpending("frames:{a}", "people")["pending"] + \
        sync_redis.xpending("frames:{b}", "people")["pending"] > 0
    os.kill(victim.proc.pid, signal.SIGKILL)  # mid-batch, with frames in flight
    victim.proc.wait()
    wait_until(lambda: len(outcomes(sync_redis)) >= 330, 90, "every frame's outcome")
    time.sleep(1.5)  # anything doubled would show up now
    done = outcomes(sync_redis)
    assert len(done) == len(set(done)) == 330 and set(done) == sent
    assert all(sync_redis.xpending(s, "people")["pending"] == 0 for s in STREAMS)
    survivors = sum(d.get("/health")[1]["pipelines"][0]["reclaimed"] for d in (group[0], group[2]))
    assert survivors > 0  # the dead daemon's frames were taken over


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["sigterm", "sighup"])
def test_a_stop_signal_drains_in_flight_work_and_leaves_the_rest_pending(daemons, redis_url, sync_redis, gradient,
                                                                          signum):
    """SIGHUP too (the terminal that started the daemon closed): it ended the daemon at once."""
    jpeg = encode(gradient)
    sent = {("frames:{a}", sync_redis.xadd("frames:{a}", {"image": jpeg}).decode()) for _ in range(12)}
    config = dict(pipeline="model = \"fake/slow\"\nbatch_size = 4\nmax_in_flight = 8",
                  fake="delay_s = 1.5", top="shutdown_timeout_s = 2.5")
    d = daemons(redis_url, **config)
    d.wait_ready()
    wait_until(lambda: d.get("/health")[1]["workers"][0]["busy"], 30, "a batch in flight")
    d.proc.send_signal(signum)
    assert d.proc.wait(10) == 0
    log = d.output()
    assert "Traceback" not in log and "stopping" in log
    first = outcomes(sync_redis)
    assert len(first) >= 4  # the batch in flight was finished and published
    # What it did not finish is still in Redis: a new daemon (same host, same consumer name) does it.
    d2 = daemons(redis_url, **config)
    d2.wait_ready()
    wait_until(lambda: len(outcomes(sync_redis)) >= 12, 60, "the rest")
    time.sleep(1)
    done = outcomes(sync_redis)
    assert len(done) == 12 and set(done) == sent


def one_slow_call(daemons, redis_url, sync_redis, gradient, call_s: int, shutdown_s: int) -> Daemon:
    """A daemon whose model is in a `call_s` call on its one frame."""
    sync_redis.xadd("frames:{a}", {"image": encode(gradient)})
    d = daemons(redis_url, pipeline="model = \"fake/slow\"", fake=f"delay_s = {call_s}",
                top=f"shutdown_timeout_s = {shutdown_s}")
    d.wait_ready()
    wait_until(lambda: d.get("/health")[1]["workers"][0]["busy"], 30, "a batch in flight")
    return d


def test_a_second_signal_exits_at_once(daemons, redis_url, sync_redis, gradient):
    d = one_slow_call(daemons, redis_url, sync_redis, gradient, call_s=60, shutdown_s=60)
    d.proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert d.proc.poll() is None  # draining: waiting for the minute-long batch
    started = time.monotonic()
    d.proc.send_signal(signal.SIGINT)
    assert d.proc.wait(5) != 0 and time.monotonic() - started < 5
    assert sync_redis.xpending("frames:{a}", "people")["pending"] == 1  # left for another daemon


def test_a_call_that_outlasts_the_drain_does_not_keep_the_process(daemons, redis_url, sync_redis, gradient):
    """A model call cannot be stopped; the interpreter would wait for its thread at exit, for
    as long as the call lasts. The daemon exits once the drain's time is up."""
    d = one_slow_call(daemons, redis_url, sync_redis, gradient, call_s=120, shutdown_s=1)
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(30) == 0  # not after the two-minute call
    log = d.output()
    assert "exiting_past_running_calls" in log and "Traceback" not in log
    assert sync_redis.xpending("frames:{a}", "people")["pending"] == 1  # left for another daemon
