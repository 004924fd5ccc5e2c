"""The Redis an operator really runs: ACL users with less than every command, Redis at
maxmemory. Each test has its own redis-server (their settings are server-wide)."""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio
from structlog.testing import capture_logs

from sightstream.daemon.daemon import Daemon
from sightstream.daemon.embedded_redis import EmbeddedRedis
from sightstream.errors import ConfigError
from sightstream.prompts import PromptStore
from tests.conftest import encode
from tests.integration.helpers import client_for, running, settings_for, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def server():
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def admin(server):
    client = redis.Redis.from_url(server.url)
    yield client
    client.close()


def user_url(server, admin, *rules: str) -> str:
    admin.execute_command("ACL", "SETUSER", "ss", "reset", "on", ">pw", *rules)
    return server.url.replace("redis://", "redis://ss:pw@")


async def test_a_user_without_scripting_stops_the_start_with_one_line_naming_it(server, admin, tmp_path):
    """Every result is written by a script: such a daemon said ready and left every frame
    pending for ever, retrying each at every reclaim."""
    url = user_url(server, admin, "~*", "&*", "+@all", "-@scripting")
    daemon = Daemon(settings_for(url, tmp_path))
    try:
        with pytest.raises(ConfigError, match=r"redis refuses Lua scripts \(EVAL\).*allow \+@scripting"):
            await asyncio.wait_for(daemon.start(), 30)
    finally:
        await daemon.stop()


async def test_a_user_without_info_or_script_load_serves_frames_prompts_and_jobs(server, admin, tmp_path,
                                                                                gradient):
    """`+@all -@dangerous` takes INFO away: the start waited for ever on it ("workers are not
    up"). SCRIPT LOAD refused (or renamed away) leaves EVAL: scripts are sent whole."""
    url = user_url(server, admin, "~*", "&*", "+@all", "-@dangerous", "-script")
    async with running(settings_for(url, tmp_path)) as d:
        http = await client_for(d)
        try:
            admin.script_flush()  # scripts are asked for by SHA first: as after a Redis restart
            for _ in range(3):
                admin.xadd("frames:{acl}", {"image": encode(gradient)})
            await wait_for(lambda: admin.xlen("results:people:frames:{acl}") == 3, 20)
            r = await http.post("/jobs", json={"source": "redis://cams:{acl}", "model": "tiny/det"})
            assert r.status == 201, await r.text()
            assert (await http.get("/health/ready")).status == 200
        finally:
            await http.close()
    assert b"script" in admin.execute_command("ACL", "LOG", "1")[0][b"object"].lower()  # it was refused


async def test_a_user_without_the_notice_channels_polls_and_says_so_once(server, admin, tmp_path):
    """Redis 7 gives a new user no channel: each subscription failed, was counted a success
    (redis-py's SUBSCRIBE does not wait for Redis's answer), and was tried again at the
    shortest back-off: 26 log lines a second, for ever."""
    url = user_url(server, admin, "~*", "resetchannels", "+@all")
    settings = settings_for(url, tmp_path, [{"model": "fake/echo", "prompt": "one"}],
                            fakes={"echo": {"adapter": "Echo"}}, prompt_poll_s=0.3)
    with capture_logs() as logged:
        async with running(settings) as d:
            await asyncio.sleep(3)
            # changed by a user who may publish the notice; this daemon sees it by its poll
            async with redis.asyncio.Redis.from_url(server.url) as other:
                await PromptStore(other, {}).set("people", "two")
            await wait_for(lambda: d.prompt_book.current("people").text == "two", 5, "the poll to see it")
            # changes made through this daemon are written and answered as such: its notice is
            # lost (it was a 503 after the write: a retried PUT met 409, a job was made twice)
            http = await client_for(d)
            try:
                r = await http.put("/pipelines/people/prompt", json={"text": "three"})
                assert r.status == 200 and (await r.json())["version"] == 3, await r.text()
                r = await http.post("/jobs", json={"source": "redis://cams:{nochan}", "model": "fake/echo",
                                                   "prompt": "x"})
                assert r.status == 201, await r.text()
                job_id = (await r.json())["job_id"]
                await wait_for(lambda: admin.hget(f"sightstream:job:{{{job_id}}}", "status") == b"running",
                               10, "the job found by the poll")
            finally:
                await http.close()
    refused = sorted(e["channel"] for e in logged if e["event"] == "channel_refused")
    assert refused == ["sightstream:jobs", "sightstream:prompts"]
    assert len([e for e in logged if e["event"] in ("redis_error", "redis_recovered")]) <= 2


async def test_redis_at_maxmemory_holds_results_until_it_has_room(server, admin, tmp_path, gradient):
    """Results refused for want of memory were tried max_deliveries times and dead-lettered
    (22 of 80 in a black-box run, written once Redis had room again); readiness said 200."""
    jpeg = encode(gradient)
    settings = settings_for(server.url, tmp_path, [{"max_deliveries": 2}])
    async with running(settings) as d:
        http = await client_for(d)
        try:
            admin.xadd("frames:{oom}", {"image": jpeg})
            await wait_for(lambda: admin.xlen("results:people:frames:{oom}") == 1)
            sent = [admin.xadd("frames:{oom}", {"image": jpeg}) for _ in range(5)]
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", max(1, int(admin.info("memory")["used_memory"]) - 100_000))
            await asyncio.sleep(4)  # two tries were given up after ~1 s
            r = await http.get("/health/ready")
            problems = (await r.json())["problems"]
            assert r.status == 503 and problems == ["redis is out of memory (maxmemory): it refuses writes, "
                                                    "results wait"], problems
            assert admin.xlen("results:people:frames:{oom}") == 1 and not admin.exists("deadletter:people:frames:{oom}")
            admin.config_set("maxmemory", 0)
            await wait_for(lambda: admin.xlen("results:people:frames:{oom}") == 6, 15)
        finally:
            await http.close()
    assert not admin.exists("deadletter:people:frames:{oom}") and len(sent) == 5
    assert admin.xpending("frames:{oom}", "people")["pending"] == 0


async def test_a_start_at_maxmemory_waits_and_an_evicting_redis_is_warned_of(server, admin, tmp_path):
    """The consumer lease refused for want of memory ended the start (exit 1: a restart loop
    under systemd); and nothing said that Redis would evict frames, groups and results."""
    admin.config_set("maxmemory-policy", "allkeys-lru")
    admin.config_set("maxmemory", 1)
    daemon = Daemon(settings_for(server.url, tmp_path), host="testhost", discover_s=0.2)
    with capture_logs() as logged:
        starting = asyncio.create_task(daemon.start())
        try:
            await asyncio.sleep(2)
            assert not starting.done()  # waiting for room
            admin.config_set("maxmemory", 0)
            await asyncio.wait_for(starting, 20)
        finally:
            await daemon.stop()
    (warned,) = [e for e in logged if e["event"] == "redis_evicts_keys"]
    assert warned["maxmemory_policy"] == "allkeys-lru" and "noeviction" in warned["hint"]
    assert any("maxmemory" in e.get("error", "") for e in logged if e["event"] == "redis_error")


async def test_a_job_at_maxmemory_waits_for_room_rather_than_failing(server, admin, tmp_path, gradient):
    """A refused job write failed the job: a pipeline's video input, which runs as a job, lost
    its results for a short spell of OOM."""
    jpeg = encode(gradient)
    settings = settings_for(server.url, tmp_path, fakes={"slow": {"delay_s": 0.3}})
    async with running(settings) as d:
        http = await client_for(d)
        try:
            r = await http.post("/jobs", json={"source": "redis://cams:{oom}", "model": "fake/slow", "fps": 100})
            job_id = (await r.json())["job_id"]
            await wait_for(lambda: admin.hget(f"sightstream:job:{{{job_id}}}", "status") == b"running")
            await asyncio.sleep(0.3)
            for i in range(4):
                admin.xadd("cams:{oom}", {"image": jpeg, "ts": str(1_800_000_000_000 + 100 * i)})
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", max(1, int(admin.info("memory")["used_memory"]) - 100_000))
            await asyncio.sleep(3)
            assert (await (await http.get(f"/jobs/{job_id}")).json())["status"] == "running"
            admin.config_set("maxmemory", 0)
            await wait_for(lambda: admin.xlen(f"results:job:{{{job_id}}}") == 4, 20)
            for i in range(4, 6):  # its progress is written again (a refused write ended its writer)
                admin.xadd("cams:{oom}", {"image": jpeg, "ts": str(1_800_000_000_000 + 100 * i)})
            for _ in range(100):  # written every half second
                job = await (await http.get(f"/jobs/{job_id}")).json()
                if job["counts"]["decoded"] == 6:
                    break
                await asyncio.sleep(0.1)
            assert job["counts"]["decoded"] == 6, job
            assert job["status"] == "running" and job["counts"]["dead_lettered"] == 0, job
        finally:
            await http.close()


async def test_the_acl_docs_give_serves_frames_prompts_and_jobs(server, admin, tmp_path, gradient):
    """The ACL user docs/operations.md gives, as written there."""
    import re
    from pathlib import Path

    docs = (Path(__file__).parents[2] / "docs" / "operations.md").read_text()
    (line,) = re.findall(r"^\s*ACL SETUSER sightstream on >password (.+)$", docs, re.M)
    url = user_url(server, admin, *line.split())
    settings = settings_for(url, tmp_path, [{"model": "fake/echo", "prompt": "one"}],
                            fakes={"echo": {"adapter": "Echo"}})
    async with running(settings) as d:
        http = await client_for(d)
        try:
            admin.xadd("frames:{doc}", {"image": encode(gradient)})
            await wait_for(lambda: admin.xlen("results:people:frames:{doc}") == 1, 20)
            r = await http.put("/pipelines/people/prompt", json={"text": "two"})
            assert r.status == 200, await r.text()
            r = await http.post("/jobs", json={"source": "redis://frames:{doc}", "model": "fake/echo",
                                               "prompt": "x"})
            assert r.status == 201, await r.text()
            assert (await http.get("/health/ready")).status == 200
        finally:
            await http.close()
    assert admin.execute_command("ACL", "LOG") == []  # nothing it needed was refused
