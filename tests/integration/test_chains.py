"""Chained pipelines (`prompt_from`): SAM2 prompted by the detections of an upstream pipeline,
each pipeline its own consumer group, joined by the upstream's result streams (real Redis)."""

from __future__ import annotations

import asyncio
import json

import pytest

from sightstream.daemon.daemon import Daemon
from sightstream.errors import ConfigError
from tests import tiny_hf
from tests.conftest import encode
from tests.integration.helpers import entries, pending, running, serving, settings_for, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sam2_path(tmp_path_factory):
    return tiny_hf.sam2(tmp_path_factory.mktemp("sam2") / "sam2")


def chained(redis_url, tmp_path, sam2_path, prompt: str = ""):
    settings = settings_for(redis_url, tmp_path, [
        {"name": "faces", "model": "retinaface/mobilenet", "input": ["frames:*"]},
        {"name": "masks", "model": "user/sam2", "prompt_from": "faces", "prompt": prompt,
         "batch_timeout_ms": 200},
    ])
    settings.models["user"] = {"sam2": type(settings.models["tiny"]["det"])(
        backend="transformers", task="segment", path=str(sam2_path))}
    return settings


async def test_sam2_segments_each_upstream_detection(redis_url, sync_redis, tmp_path, sam2_path,
                                                     astronaut_jpeg, gradient):
    settings = chained(redis_url, tmp_path, sam2_path)
    assert settings.pipelines[1].input == ["results:faces:frames:*"]
    ids = [sync_redis.xadd("frames:{cam}", {"image": img, "meta": json.dumps({"n": i})}).decode()
           for i, img in enumerate([astronaut_jpeg, encode(gradient)])]
    async with running(settings):
        await wait_for(lambda: sync_redis.xlen("results:masks:frames:{cam}") == 2, 60, "2 mask results")
    faces = {f["frame_id"].decode(): json.loads(f["result"])["detections"]
             for _, f in entries(sync_redis, "results:faces:frames:{cam}")}
    results = {f["frame_id"].decode(): f for _, f in entries(sync_redis, "results:masks:frames:{cam}")}
    assert set(results) == set(ids)
    for i, frame_id in enumerate(ids):
        fields = results[frame_id]
        assert fields["source"] == b"frames:{cam}" and fields["pipeline"] == b"masks"
        assert fields["task"] == b"segment" and json.loads(fields["meta"]) == {"n": i}
        masks = json.loads(fields["result"])["masks"]
        # one mask per upstream detection, carrying its box and label
        assert [(m["box"], m["label"]) for m in masks] == [(d["box"], d["label"]) for d in faces[frame_id]]
    assert len(faces[ids[0]]) >= 1 and faces[ids[1]] == []  # the astronaut's face; none in a gradient
    assert pending(sync_redis, "results:faces:frames:{cam}", "masks") == 0
    assert not sync_redis.exists("results:masks:results:faces:frames:{cam}")  # nothing read twice


async def test_a_chained_pipeline_s_figures_are_by_the_source_it_reads_the_results_of(
        redis_url, sync_redis, tmp_path, sam2_path, astronaut_jpeg):
    """The live page and `sightstream status` join a pipeline's pending entries and its frames
    read by source: a chained pipeline's stream is its upstream's results of a source, so its
    tiles said 0 frames/s in, pending '?', and status listed each source twice."""
    from sightstream.status import gather

    for _ in range(2):
        sync_redis.xadd("frames:{cam}", {"image": astronaut_jpeg})
    async with serving(chained(redis_url, tmp_path, sam2_path)) as (d, client):
        await wait_for(lambda: sync_redis.xlen("results:masks:frames:{cam}") == 2, 60, "2 mask results")
        (described,) = (await (await client.get("/pipelines/masks")).json())["sources"]
        assert described["stream"] == "results:faces:frames:{cam}" and described["source"] == "frames:{cam}"
        tiles = {(s["pipeline"], s["source"]): s for s in (await (await client.get("/sources")).json())["sources"]}
        assert tiles[("masks", "frames:{cam}")]["read"] == 2
        base = str(client.make_url("")).rstrip("/")
        listed = [(s["pipeline"], s["source"]) for s in (await asyncio.to_thread(gather, base, ""))["sources"]]
    assert listed.count(("masks", "frames:{cam}")) == 1 and len(listed) == 2


async def test_the_prompt_keeps_only_some_labels(redis_url, sync_redis, tmp_path, sam2_path, astronaut_jpeg):
    settings = chained(redis_url, tmp_path, sam2_path, prompt='{"labels": ["cat"]}')
    sync_redis.xadd("frames:{cam}", {"image": astronaut_jpeg})
    async with running(settings):
        await wait_for(lambda: sync_redis.xlen("results:masks:frames:{cam}") == 1, 60)
    (_, fields), = entries(sync_redis, "results:masks:frames:{cam}")
    assert json.loads(fields["result"])["masks"] == []  # a face is not a cat


async def test_upstream_entries_that_cannot_be_followed_are_dead_lettered(
    redis_url, sync_redis, tmp_path, sam2_path, gradient
):
    settings = chained(redis_url, tmp_path, sam2_path)
    settings.pipelines = settings.pipelines[1:]  # the upstream runs elsewhere
    settings.pipelines[0].input = ["results:faces:frames:*"]
    gone = sync_redis.xadd("frames:{cam}", {"image": encode(gradient)}).decode()
    sync_redis.xdel("frames:{cam}", gone)  # trimmed before the chain got to it
    result = json.dumps({"width": 96, "height": 64, "detections": []})
    sync_redis.xadd("results:faces:frames:{cam}", {"source": "frames:{cam}", "frame_id": gone,
                                                    "ts": "1", "result": result})
    sync_redis.xadd("results:faces:frames:{cam}", {"source": "frames:{cam}", "result": "{}"})
    sync_redis.set("frames:{str}", "not a stream")  # a source key of another type
    sync_redis.xadd("results:faces:frames:{cam}", {"source": "frames:{str}", "frame_id": "1-0",
                                                    "ts": "1", "result": result})
    async with running(settings):
        await wait_for(lambda: sync_redis.xlen("deadletter:masks:frames:{cam}") == 1, 30)
        await wait_for(lambda: sync_redis.xlen("deadletter:masks:results:faces:frames:{cam}") == 1, 30)
        await wait_for(lambda: sync_redis.xlen("deadletter:masks:frames:{str}") == 1, 30)
    (_, dead), = entries(sync_redis, "deadletter:masks:frames:{cam}")
    assert dead["reason"] == b"source_gone" and dead["frame_id"].decode() == gone
    (_, wrong), = entries(sync_redis, "deadletter:masks:frames:{str}")
    assert wrong["reason"] == b"source_gone" and b"WRONGTYPE" in wrong["error"]
    (_, bad), = entries(sync_redis, "deadletter:masks:results:faces:frames:{cam}")
    assert bad["reason"] == b"bad_fields" and b"detect results" in bad["error"]
    assert pending(sync_redis, "results:faces:frames:{cam}", "masks") == 0


def test_a_chain_needs_a_model_prompted_by_detections_and_an_upstream_that_detects(redis_url, tmp_path, sam2_path):
    settings = settings_for(redis_url, tmp_path, [
        {"name": "faces"}, {"name": "more", "prompt_from": "faces"}])
    with pytest.raises(ConfigError, match=r"pipelines\[more\].prompt_from: tiny/det is not prompted by detections"):
        Daemon(settings)
    settings = chained(redis_url, tmp_path, sam2_path)
    settings.pipelines[0].model = "user/sam2"
    with pytest.raises(ConfigError, match="pipeline faces does not detect"):
        Daemon(settings)
    # boxes or points in a chained pipeline's prompt would be ignored: refused, in the config and over HTTP
    with pytest.raises(ConfigError, match=r"pipelines\[masks\].prompt: a chained pipeline takes its boxes"):
        Daemon(chained(redis_url, tmp_path, sam2_path, prompt='{"boxes": [[1, 2, 3, 4]]}'))


async def test_a_chained_pipelines_prompt_over_http_only_keeps_labels(redis_url, tmp_path, sam2_path):
    async with serving(chained(redis_url, tmp_path, sam2_path)) as (d, client):
        for text in ('{"boxes": [[1, 2, 3, 4]]}', '{"points": [[5, 5]]}'):
            r = await client.put("/pipelines/masks/prompt", json={"text": text})
            body = await r.json()  # was 200, a new version that changed nothing
            assert r.status == 422 and "may only keep some of their labels" in body["error"]["message"], body
        r = await client.put("/pipelines/masks/prompt", json={"text": '{"labels": ["person"]}'})
        assert r.status == 200
