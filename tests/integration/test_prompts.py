"""Versioned prompts over a real socket and a real redis-server: versions, history, rollback,
conditional changes, per-model validation, and a change seen by a second daemon."""

from __future__ import annotations

import asyncio
import json

import pytest
from structlog.testing import capture_logs

from sightstream.config import ModelEntry
from sightstream.prompts import Prompt
from tests.conftest import encode
from tests.integration.helpers import client_for, entries, running, serving, settings_for, wait_for

pytestmark = pytest.mark.integration


def prompt_settings(redis_url, tmp_path, **extra):
    settings = settings_for(redis_url, tmp_path, [
        {"name": "people", "model": "fake/echo", "prompt": "cats", "batch_timeout_ms": 50},
        {"name": "segs", "model": "user/sam2", "input": ["segs:*"]},
        {"name": "finder", "model": "user/owl", "input": ["finder:*"]},
        {"name": "faces", "input": ["faces:*"]},
    ], fakes={"echo": {"adapter": "Echo"}}, **extra)
    settings.models["user"] = {
        "sam2": ModelEntry(backend="transformers", task="segment", adapter="hf_sam2", path=str(tmp_path)),
        "owl": ModelEntry(backend="transformers", task="detect", adapter="hf_open_vocab", path=str(tmp_path)),
    }
    return settings



async def test_versions_history_rollback_and_conditional_changes(redis_url, tmp_path):
    async with serving(prompt_settings(redis_url, tmp_path)) as (d, client):
        r = await client.get("/pipelines/people/prompt")
        body = await r.json()
        assert r.status == 200 and body["text"] == "cats" and body["version"] == 1
        assert body["updated_at"] is None and body["set_by"] == "config" and r.headers["ETag"] == '"1"'

        r = await client.put("/pipelines/people/prompt", json={"text": "dogs"})
        body = await r.json()
        assert r.status == 200 and body["version"] == 2 and body["text"] == "dogs"
        assert body["updated_at"].endswith("Z") and r.headers["ETag"] == '"2"'

        r = await client.post("/pipelines/people/prompt/rollback", json={"version": 1})
        body = await r.json()
        assert (body["version"], body["text"], body["rolled_back_from"]) == (3, "cats", 1)

        history = (await (await client.get("/pipelines/people/prompt/history")).json())["versions"]
        assert [(v["version"], v["text"]) for v in history] == [(3, "cats"), (2, "dogs"), (1, "cats")]

        # Based on version 2, but someone made version 3 meanwhile.
        r = await client.put("/pipelines/people/prompt", json={"text": "birds"}, headers={"If-Match": '"2"'})
        body = await r.json()
        assert r.status == 409 and body["error"]["code"] == "conflict" and "version 3" in body["error"]["message"]
        r = await client.put("/pipelines/people/prompt", json={"text": "birds", "expected_version": 2})
        assert r.status == 409
        r = await client.put("/pipelines/people/prompt", json={"text": "birds"}, headers={"If-Match": "3"})
        assert r.status == 200 and (await r.json())["version"] == 4
        r = await client.post("/pipelines/people/prompt/rollback", json={"version": 2, "expected_version": 3})
        assert r.status == 409
        assert (await (await client.get("/pipelines/people/prompt")).json())["text"] == "birds"
        # PUT is idempotent: the current text again makes no version (each one did: a retried
        # request, or a deploy script run twice, grew the history)
        r = await client.put("/pipelines/people/prompt", json={"text": "birds"})
        assert r.status == 200 and (await r.json())["version"] == 4 and r.headers["ETag"] == '"4"'
        history = (await (await client.get("/pipelines/people/prompt/history")).json())["versions"]
        assert [v["version"] for v in history] == [4, 3, 2, 1]


async def test_bad_requests_are_4xx_naming_why(redis_url, tmp_path):
    async with serving(prompt_settings(redis_url, tmp_path)) as (d, client):
        async def error(method, path, status, **kw):
            r = await client.request(method, path, **kw)
            assert r.status == status, (path, r.status, await r.text())
            return (await r.json())["error"]["message"]

        assert "no pipeline named" in await error("GET", "/pipelines/nope/prompt", 404)
        assert "no pipeline named" in await error("PUT", "/pipelines/nope/prompt", 404, json={"text": "x"})
        assert "not valid JSON" in await error("PUT", "/pipelines/people/prompt", 400, data=b"{text")
        assert "body is empty" in await error("PUT", "/pipelines/people/prompt", 400, data=b"")
        assert "cannot be read" in await error("PUT", "/pipelines/people/prompt", 400, data=b'{"text": "x"}',
                                               headers={"Content-Encoding": "gzip"})  # not gzip
        assert "send one of them" in await error("PUT", "/pipelines/people/prompt", 400,
                                                 json={"text": "x", "expected_version": 3},
                                                 headers={"If-Match": '"1"'})
        assert "text" in await error("PUT", "/pipelines/people/prompt", 422, json={})
        assert "text" in await error("PUT", "/pipelines/people/prompt", 422, json={"text": 5})
        assert "If-Match" in await error("PUT", "/pipelines/people/prompt", 400, json={"text": "x"},
                                         headers={"If-Match": "yesterday"})
        assert "no version 9" in await error("POST", "/pipelines/people/prompt/rollback", 422, json={"version": 9})
        assert "version" in await error("POST", "/pipelines/people/prompt/rollback", 422, json={"version": 0})
        # Per model: what the pipeline's model cannot use is refused when it is set.
        assert "SAM2 prompt is JSON" in await error("PUT", "/pipelines/segs/prompt", 422, json={"text": "{oops"})
        assert "box" in await error("PUT", "/pipelines/segs/prompt", 422,
                                    json={"text": '{"boxes": [["a", 1, 2, 3]]}'})
        assert "labels to find" in await error("PUT", "/pipelines/finder/prompt", 422, json={"text": " . ;"})
        assert "takes no prompt" in await error("PUT", "/pipelines/faces/prompt", 422, json={"text": "x"})
        # a rollback is checked as a new text is: a model that takes no prompt gets none this way
        assert "takes no prompt" in await error("POST", "/pipelines/faces/prompt/rollback", 422, json={"version": 1})
        assert "echo" in await error("PUT", "/pipelines/people/prompt", 422, json={"text": "  "})
        ok = await client.put("/pipelines/segs/prompt", json={"text": '{"boxes": [[1, 2, 30, 40]]}'})
        assert ok.status == 200
        assert (await (await client.get("/pipelines/people/prompt")).json())["version"] == 1  # nothing changed


async def test_a_change_is_in_effect_on_another_daemon_within_a_second_and_recorded(
        redis_url, sync_redis, tmp_path, gradient):
    settings = prompt_settings(redis_url, tmp_path)
    async with running(settings, host="a") as a, running(settings, host="b") as b:
        client = await client_for(a)
        try:
            assert b.prompt_book.current("people").version == 1
            r = await client.put("/pipelines/people/prompt", json={"text": "dogs"})
            assert r.status == 200
            # Pub/sub, not the 5 s poll: the other daemon has it within a second.
            await wait_for(lambda: b.prompt_book.current("people").version == 2, 1.0, "the change on daemon b")
            assert b.prompt_book.current("people").text == "dogs"
        finally:
            await client.close()
        await wait_for(lambda: a.prompt_book.current("people").version == 2, 1.0, "the change on daemon a")
        for _ in range(6):
            sync_redis.xadd("frames:{p}", {"image": encode(gradient)})
        await wait_for(lambda: sync_redis.xlen("results:people:frames:{p}") == 6)
    for _, f in entries(sync_redis, "results:people:frames:{p}"):
        assert f["prompt_version"] == b"2"
        assert json.loads(f["result"])["prompt"] == {"text": "dogs", "version": 2}


async def test_notices_missed_while_disconnected_are_caught_up(redis_url, sync_redis, tmp_path):
    settings = prompt_settings(redis_url, tmp_path, prompt_poll_s=600)  # no poll: only the re-read
    async with running(settings) as d:
        await wait_for(lambda: any(c.get("cmd") == "subscribe" or c.get("sub") == "1"
                                   for c in sync_redis.client_list()), what="the subscription")
        sync_redis.client_kill_filter(_type="pubsub")
        # Changed behind the daemon's back while its subscription is down: no notice reaches it.
        await d.prompts.set("people", "fish")
        await wait_for(lambda: d.prompt_book.current("people").text == "fish", 5, "the re-read after reconnecting")


async def test_named_tokens_are_recorded_as_who_set_the_prompt(redis_url, tmp_path):
    settings = prompt_settings(redis_url, tmp_path, control={"port": 0, "tokens": {"alice": "a-secret"}})
    async with serving(settings) as (d, client):
        r = await client.put("/pipelines/people/prompt", json={"text": "dogs"})
        assert r.status == 401
        r = await client.put("/pipelines/people/prompt", json={"text": "dogs"},
                             headers={"Authorization": "Bearer a-secret"})
        assert r.status == 200 and (await r.json())["set_by"] == "alice"


async def test_concurrent_changes_each_answer_their_own_version(redis_url, tmp_path):
    async with serving(prompt_settings(redis_url, tmp_path)) as (d, client):
        replies = await asyncio.gather(*(client.put("/pipelines/people/prompt", json={"text": f"t{i}"})
                                         for i in range(20)))
        bodies = [await r.json() for r in replies]
        assert sorted(b["version"] for b in bodies) == list(range(2, 22))
        assert all(b["text"] == f"t{i}" for i, b in enumerate(bodies))
        assert all(r.headers["ETag"] == f'"{b["version"]}"' for r, b in zip(replies, bodies))


async def test_the_config_s_prompt_is_one_version_for_every_daemon_and_an_edit_is_a_new_one(
        redis_url, sync_redis, tmp_path, gradient):
    """Two daemons whose configs said "beta" and "gamma" each used their own text as version 1:
    results said version 1 for two prompts. The first daemon's config is version 1 for all; a
    daemon started on an edited config makes it a new version; a change over HTTP outlives
    restarts while the config stays the same."""
    beta, gamma = prompt_settings(redis_url, tmp_path), prompt_settings(redis_url, tmp_path)
    beta.pipelines[0].prompt, gamma.pipelines[0].prompt = "beta", "gamma"
    async with running(beta, host="a") as a:
        async with running(beta, host="b") as b:
            assert a.prompt_book.current("people") == b.prompt_book.current("people")
            assert (b.prompt_book.current("people").text, b.prompt_book.current("people").version) == ("beta", 1)
        async with running(gamma, host="c") as c:  # the config edited: a new version, for all
            assert (c.prompt_book.current("people").text, c.prompt_book.current("people").version) == ("gamma", 2)
            await wait_for(lambda: a.prompt_book.current("people").version == 2, 2.0, "the edit on daemon a")
            version = await c.prompts.set("people", "set over HTTP")
            assert version.version == 3
    async with running(gamma, host="c") as c:  # the same config: the change over HTTP stays
        assert (c.prompt_book.current("people").text, c.prompt_book.current("people").version) == (
            "set over HTTP", 3)
        history = [(v.version, v.text, v.set_by) for v in (await c.prompts.history("people"))[0]]
    assert history == [(3, "set over HTTP", ""), (2, "gamma", "config"), (1, "beta", "config")]


async def test_a_daemon_restarted_on_the_old_config_does_not_undo_a_rolling_change(redis_url, tmp_path):
    """Mid-rollout, a daemon still on the old config restarted (a crash, a node drained) made
    the old text the newest version for every daemon: the change was undone, silently."""
    old, new = prompt_settings(redis_url, tmp_path), prompt_settings(redis_url, tmp_path)
    old.pipelines[0].prompt, new.pipelines[0].prompt = "hello", "hello2"
    async with running(old, host="a"):
        pass
    async with running(new, host="b") as b:
        assert (b.prompt_book.current("people").text, b.prompt_book.current("people").version) == ("hello2", 2)
        with capture_logs() as logs:
            async with running(old, host="a") as a:  # restarted before its config was rolled
                assert (a.prompt_book.current("people").text, a.prompt_book.current("people").version) == (
                    "hello2", 2)
        (warned,) = [e for e in logs if e["event"] == "prompt_config_not_applied"]
        assert warned["version"] == 2 and "PUT /pipelines/people/prompt" in warned["hint"]
        assert b.prompt_book.current("people").version == 2
    third = prompt_settings(redis_url, tmp_path)
    third.pipelines[0].prompt = "hello3"
    async with running(third, host="c") as c:  # a new edit still applies
        assert (c.prompt_book.current("people").text, c.prompt_book.current("people").version) == ("hello3", 3)


async def test_the_history_comes_a_page_at_a_time(redis_url, tmp_path):
    """It came whole (`?limit=` was ignored): 300 changes of 100 KB answered 30 MB."""
    async with serving(prompt_settings(redis_url, tmp_path)) as (d, client):
        for n in range(2, 8):
            await d.prompts.set("people", f"text {n}")

        async def page(query: str) -> dict:
            r = await client.get(f"/pipelines/people/prompt/history{query}")
            assert r.status == 200
            return await r.json()

        first = await page("?limit=3")
        assert [v["version"] for v in first["versions"]] == [7, 6, 5] and first["next_before"] == 5
        second = await page(f"?limit=3&before={first['next_before']}")
        assert [v["version"] for v in second["versions"]] == [4, 3, 2] and second["next_before"] == 2
        last = await page("?limit=3&before=2")
        assert [(v["version"], v["text"]) for v in last["versions"]] == [(1, "cats")] and last["next_before"] is None
        assert [v["version"] for v in (await page(""))["versions"]] == [7, 6, 5, 4, 3, 2, 1]
        r = await client.get("/pipelines/people/prompt/history?limit=0")
        assert r.status == 422 and "limit" in (await r.json())["error"]["message"]
        r = await client.post("/pipelines/people/prompt/rollback", json={"version": 3})
        assert r.status == 200 and (await r.json())["text"] == "text 3"


async def test_a_prompt_set_before_the_upgrade_is_kept_whatever_the_config_says(redis_url, sync_redis, tmp_path):
    """The previous version kept no `configured` field, and ignored config edits once the prompt
    had been changed: its config's text may be older than the prompt set over HTTP since."""
    sync_redis.rpush("sightstream:prompt:{people}:history", json.dumps({"version": 1, "text": "cat", "set_by": "config"}),
                     json.dumps({"version": 2, "text": "bird", "set_by": "alice", "updated_at": "2026-01-01T00:00:00Z"}))
    sync_redis.hset("sightstream:prompt:{people}", mapping={"version": 2, "text": "bird", "set_by": "alice",
                                                            "updated_at": "2026-01-01T00:00:00Z"})
    settings = prompt_settings(redis_url, tmp_path)
    settings.pipelines[0].prompt = "dog"  # edited under the previous version: it had no effect
    async with running(settings) as d:
        assert (d.prompt_book.current("people").text, d.prompt_book.current("people").version) == ("bird", 2)
    settings.pipelines[0].prompt = "fish"  # edited after the upgrade: a version of its own
    async with running(settings) as d:
        assert (d.prompt_book.current("people").text, d.prompt_book.current("people").version) == ("fish", 3)


async def test_a_prompt_redis_lost_is_written_back_with_its_version(redis_url, sync_redis, tmp_path, gradient):
    """A Redis restart without persistence took the prompts: the daemon went back to the
    config's text as version 1, and the next change was version 2 again, so a version named
    two texts in one results stream. The daemon's own copy is written back, its number kept."""
    async with serving(prompt_settings(redis_url, tmp_path, prompt_poll_s=0.2)) as (d, client):
        for text in ("dogs", "birds"):
            assert (await client.put("/pipelines/people/prompt", json={"text": text})).status == 200
        await wait_for(lambda: d.prompt_book.current("people").version == 3)
        sync_redis.flushdb()  # what a restart without persistence leaves
        await wait_for(lambda: sync_redis.hget("sightstream:prompt:{people}", "version") == b"3", 5,
                       "the prompt written back")
        body = await (await client.get("/pipelines/people/prompt")).json()
        assert (body["text"], body["version"], body["set_by"]) == ("birds", 3, "restored")
        history = (await (await client.get("/pipelines/people/prompt/history")).json())["versions"]
        assert [(v["version"], v["text"], v["lost"]) for v in history] == [
            (3, "birds", False), (2, "", True), (1, "", True)]
        r = await client.post("/pipelines/people/prompt/rollback", json={"version": 2})
        assert r.status == 422 and "version 2's text was lost with Redis's data" in (
            await r.json())["error"]["message"]
        r = await client.put("/pipelines/people/prompt", json={"text": "fish"})
        assert (await r.json())["version"] == 4
        await wait_for(lambda: d.prompt_book.current("people").version == 4)
        # lost again, and a daemon started since seeds its config's as version 1 first: the
        # running one's newer copy wins, as does one over an older restored copy
        sync_redis.flushdb()
        await d.prompts.apply_config(["people"])
        await wait_for(lambda: sync_redis.hget("sightstream:prompt:{people}", "version") == b"4", 15,
                       "the newer copy over the config's")
        sync_redis.flushdb()
        await d.prompts.restore("people", Prompt("birds", 3))  # a daemon that missed version 4
        await wait_for(lambda: sync_redis.hget("sightstream:prompt:{people}", "version") == b"4", 15,
                       "the newer copy over an older one")
        assert d.prompt_book.current("people") == Prompt("fish", 4)
        sync_redis.xadd("frames:{p}", {"image": encode(gradient)})
        await wait_for(lambda: sync_redis.xlen("results:people:frames:{p}") == 1)
    assert entries(sync_redis, "results:people:frames:{p}")[0][1]["prompt_version"] == b"4"
