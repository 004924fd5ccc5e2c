"""Redis goes away and comes back: the daemon stays up, reports not-ready, does not spin, and
goes on; with AOF nothing is lost, without persistence its groups are re-created."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
from structlog.testing import capture_logs

from sightstream.daemon.embedded_redis import EmbeddedRedis
from sightstream.status import status
from tests.conftest import encode
from tests.integration.helpers import client_for, entries, running, settings_for, wait_for

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("appendonly", [True, False], ids=["aof", "no-persistence"])
async def test_redis_down_and_back(tmp_path, gradient, appendonly):
    server = EmbeddedRedis(appendonly=appendonly).start()
    client = redis.Redis.from_url(server.url)
    jpeg = encode(gradient)
    try:
        sent = [client.xadd("frames:{o}", {"image": jpeg}).decode() for _ in range(40)]
        settings = settings_for(server.url, tmp_path,
                                [{"model": "fake/slow", "batch_size": 2, "max_in_flight": 4}],
                                fakes={"slow": {"delay_s": 0.1}})
        async with running(settings) as d:
            http = await client_for(d)
            try:
                await wait_for(lambda: client.xlen("results:people:frames:{o}") >= 6)
                server.stop()
                client = redis.Redis.from_url(server.url)
                r = await http.get("/health/ready")
                assert r.status == 503 and (await r.json())["problems"][0].startswith("redis is unreachable: ")
                assert (await http.get("/health/live")).status == 200
                # what an operator asks during the outage: this daemon's own figures, and what is unknown
                r = await http.get("/pipelines")
                (people,) = (await r.json())["pipelines"]
                assert r.status == 200 and people["counts"]["published"] >= 6
                assert people["pending"] is None and "redis is unreachable" in people["redis_error"]
                lines: list[str] = []
                base = str(http.make_url("")).rstrip("/")
                assert await asyncio.to_thread(status, base, "", False, lines.append) == 0
                assert "group-wide figures (PENDING, LAG) unknown: redis is unreachable" in lines[0]
                assert "jobs unknown:" in lines[0] and "frames:{o}" in lines[0]
                cpu = time.process_time()
                await asyncio.sleep(3)
                assert time.process_time() - cpu < 1.0  # backing off, not spinning
                server.start()
                ready = False
                for _ in range(100):
                    if (await http.get("/health/ready")).status == 200:
                        ready = True
                        break
                    await asyncio.sleep(0.1)
                assert ready
                if appendonly:  # nothing lost: every frame gets exactly one result
                    await wait_for(lambda: client.xlen("results:people:frames:{o}") >= 40, 60,
                                   "every frame's result after the outage")
                    await asyncio.sleep(1)
                    got = [f["frame_id"].decode() for _, f in entries(client, "results:people:frames:{o}")]
                    assert len(got) == 40 and set(got) == set(sent)
                else:  # the groups are gone with the data: new frames still flow
                    assert not client.exists("frames:{o}")
                    new = client.xadd("frames:{o}", {"image": jpeg}).decode()
                    await wait_for(lambda: client.xlen("results:people:frames:{o}") >= 1, 30,
                                   "a new frame's result")
                    (_, f), = entries(client, "results:people:frames:{o}")
                    assert f["frame_id"].decode() == new
                errors = sum(s.value for m in d.metrics.registry.collect()
                             if m.name == "sightstream_redis_errors" for s in m.samples
                             if s.name.endswith("_total"))
                assert errors > 0  # every failed call was counted
                reconnects = sum(s.value for m in d.metrics.registry.collect()
                                 if m.name == "sightstream_redis_reconnects" for s in m.samples
                                 if s.name.endswith("_total"))
                assert reconnects >= 1  # and the recovery too
            finally:
                await http.close()
    finally:
        client.close()
        server.close()


async def test_a_stop_during_an_outage_drains_without_waiting_for_redis(tmp_path, gradient):
    """Frames are being sampled, inferred and published when Redis goes away; a stop then
    ends every retry loop at once (their frames stay pending in Redis) instead of sitting out
    the shutdown timeout."""
    server = EmbeddedRedis().start()
    client = redis.Redis.from_url(server.url)
    jpeg = encode(gradient)
    try:
        for i in range(40):
            client.xadd("frames:{o}", {"image": jpeg, "ts": str(i * 100)})
        settings = settings_for(server.url, tmp_path,
                                [{"model": "fake/slow", "batch_size": 2, "max_in_flight": 8, "fps": 100}],
                                fakes={"slow": {"delay_s": 0.2}}, shutdown_timeout_s=60)
        with capture_logs() as logs:
            async with running(settings) as d:
                await wait_for(lambda: client.xlen("results:people:frames:{o}") >= 2)
                server.stop()
                # (the sampler's own give-up is a unit test: whether frames are waiting at the
                # sampler when Redis goes is up to timing)
                await wait_for(lambda: d.metrics.redis_errors.labels("publish")._value.get() > 0, 10,
                               "the publisher retrying")
                stopping = time.monotonic()
            stopped_in = time.monotonic() - stopping
        # Not the 60 s shutdown timeout, nor seconds of back-off per loop: a generous bound.
        assert stopped_in < 10, f"the stop took {stopped_in:.1f} s"
        assert d.runs["people"].in_flight.in_flight == 0  # every frame handed back
        events = [e["event"] for e in logs]
        assert "daemon_drained" in events and "shutdown_timeout_cancelling" not in events
        assert "publish_given_up_at_stop" in events
    finally:
        client.close()
        server.close()


async def test_a_redis_that_hangs_bounds_what_the_control_plane_waits(redis_url, tmp_path, monkeypatch):
    """A hung node (a cluster master stopped with SIGSTOP) held GET /pipelines for 114 s and
    GET /jobs for over a minute, while each retry waited out its socket timeout: `status`
    then said no control plane answers. The figures come with redis_error; other reads a 503."""
    from sightstream.control import errors, pipelines

    async def hang(*args, **kwargs):
        await asyncio.sleep(3600)

    monkeypatch.setattr(pipelines, "ASK_LIMIT_S", 0.3)
    monkeypatch.setattr(errors, "GET_LIMIT_S", 0.5)
    async with running(settings_for(redis_url, tmp_path)) as d:
        http = await client_for(d)
        try:
            monkeypatch.setattr(pipelines, "group_backlog", hang)
            r = await http.get("/pipelines")
            (people,) = (await r.json())["pipelines"]
            assert r.status == 200 and people["redis_error"] == "redis is unreachable: no answer within 0.3 s"
            monkeypatch.setattr(d.jobs, "page", hang)
            r = await http.get("/jobs")
            assert r.status == 503
            assert (await r.json())["error"]["message"] == "redis is unreachable: no answer within 0.5 s"
            assert (await asyncio.wait_for(http.head("/jobs"), 5)).status == 503  # a HEAD is bounded too
        finally:
            await http.close()


async def test_a_password_redis_now_asks_for_is_named_in_readiness_not_taken_for_an_outage(tmp_path):
    """A rotated or wrong password read as "redis is unreachable": operators looked at the network."""
    server = EmbeddedRedis().start()
    try:
        async with running(settings_for(server.url, tmp_path)) as d:
            http = await client_for(d)
            try:
                assert (await http.get("/health/ready")).status == 200
                admin = redis.Redis.from_url(server.url)
                admin.config_set("requirepass", "rotated")
                admin.client_kill_filter(_type="normal")  # the daemon reconnects, without it
                admin.close()
                for _ in range(20):  # the first call after the kill finds its connection closed
                    r = await http.get("/health/ready")
                    problems = (await r.json())["problems"]
                    if not problems[0].startswith("redis is unreachable"):
                        break
                    await asyncio.sleep(0.1)
                assert r.status == 503 and problems[0].startswith("redis refused this daemon's credentials (redis_url): ")
            finally:
                await http.close()
    finally:
        server.close()
