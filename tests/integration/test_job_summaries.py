"""Summaries of jobs with a tiny text model (random weights: the text is nonsense; the flow,
the windows and the storage are what is tested), over a real socket and a real redis-server."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiohttp import FormData

from sightstream import keys
from sightstream.config import ConfigError
from sightstream.jobs import summaries
from sightstream.jobs.store import JobSpec, JobStore
from sightstream.leases import Lease
from sightstream.redis_conn import make_client
from tests import fake_adapters, hls, tiny_hf
from tests.conftest import encode
from tests.integration.helpers import running, serving, settings_for, wait_for
from tests.integration.test_jobs import submit, until_status

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("summaries")
    hls.make_clip(root / "clip.mp4", seconds=3, fps=10)
    # 128 positions: 30 results need several windows, then a summary of their summaries
    tiny_hf.causal_lm(root / "lm", context=128)
    tiny_hf.causal_lm(root / "lm_plain", context=128, chat=False)
    tiny_hf.causal_lm(root / "lm_wide", context=512)
    tiny_hf.blip(root / "captioner", "caption")
    tiny_hf.blip(root / "answerer", "vqa")
    from transformers import BertConfig  # an encoder's checkpoint (its config is all that is read)

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               architectures=["BertForMaskedLM"]).save_pretrained(root / "bert")
    return root


def summary_settings(redis_url, tmp_path, media, **lm):
    settings = settings_for(redis_url, tmp_path, jobs={"allowed_paths": [str(media)], "poll_s": 0.2,
                                                       "lease_ttl_ms": 2000})
    entry = type(settings.models["tiny"]["det"])
    settings.models["llm"] = {
        "tiny": entry(backend="transformers", task="generate", path=str(media / "lm"), max_new_tokens=8, **lm),
        "plain": entry(backend="transformers", task="generate", path=str(media / "lm_plain"), max_new_tokens=8),
        "wide": entry(backend="transformers", task="generate", path=str(media / "lm_wide"), max_new_tokens=8),
        "short": entry(backend="transformers", task="generate", path=str(media / "lm"), max_new_tokens=8,
                       context_tokens=48),
        "broken": entry(backend="transformers", task="generate", path=str(media / "lm"), max_new_tokens=8,
                        adapter="tests.fake_adapters:FailingText"),
        "blip": entry(backend="transformers", task="generate", path=str(media / "captioner")),
        "bert": entry(backend="transformers", task="generate", path=str(media / "bert")),
    }
    settings.models["vlm"] = {"tiny": entry(backend="transformers", task="caption", path=str(media / "captioner"),
                                            max_new_tokens=6),
                              "vqa": entry(backend="transformers", task="vqa", path=str(media / "answerer"),
                                           max_new_tokens=4)}
    return settings


def summaries_of(sync_redis, job_id: str) -> list[dict]:
    """The summaries in a job's results stream, in order."""
    return [json.loads(f[b"result"]) for _, f in sync_redis.xrange(keys.job_results(job_id))
            if f[b"task"] == b"summary"]


@pytest.mark.parametrize("model", ["llm/tiny", "llm/plain"])
async def test_a_video_job_is_summarised_in_windows_then_as_a_whole(model, redis_url, sync_redis, tmp_path,
                                                                      media):
    async with serving(summary_settings(redis_url, tmp_path, media)) as (d, client):
        job_id = await submit(client, source=f"file://{media}/clip.mp4", fps=10,
                              summarize={"model": model, "prompt": "What happens?"})
        job = await until_status(client, job_id, "completed", "failed", timeout=60)
        assert job["status"] == "completed", job["error"]
        summary = job["summary"]
        assert summary["final"] and summary["model"] == model and isinstance(summary["text"], str)
        assert summary["lines"] == job["counts"]["processed"] == 30
        assert summary["windows"] > 1 and summary["levels"] >= 2, summary  # the context forced windows
        assert summary["from_s"] == 0 and summary["to_s"] == pytest.approx(2.9, abs=0.11)
        assert job["summarize"] == {"model": model, "prompt": "What happens?", "every_s": None}
        assert job["counts"]["summaries"] == 1
        stream = sync_redis.xrange(keys.job_results(job_id))
        last = stream[-1][1]
        assert last[b"task"] == b"summary" and last[b"model"] == model.encode()
        assert json.loads(last[b"result"]) == summary
        assert sum(1 for _, f in stream if f[b"task"] == b"summary") == 1
        page = (await (await client.get(f"/jobs/{job_id}/results", params={"count": 100})).json())["results"]
        assert page[-1]["fields"]["result"] == summary and page[-1]["fields"]["job_id"] == job_id


async def test_captions_from_a_vlm_become_the_summary_s_lines(redis_url, sync_redis, tmp_path, media, monkeypatch):
    """Fovea's flow: a VLM captions the sampled frames, a text model summarises the captions."""
    sent: list[list[str]] = []
    real = summaries.JobSummaries._generate

    async def recording(self, texts):
        sent.append(texts)
        return await real(self, texts)

    monkeypatch.setattr(summaries.JobSummaries, "_generate", recording)
    async with serving(summary_settings(redis_url, tmp_path, media)) as (d, client):
        job_id = await submit(client, source=f"file://{media}/clip.mp4", fps=2, model="vlm/tiny",
                              summarize={"model": "llm/tiny", "prompt": "Say."})
        job = await until_status(client, job_id, "completed", "failed", timeout=60)
        assert job["status"] == "completed", job["error"]
    captions = [json.loads(f[b"result"])["text"] for _, f in sync_redis.xrange(keys.job_results(job_id))
                if f[b"task"] == b"caption"]
    assert len(captions) == 6 == job["summary"]["lines"]
    first_level = [line for text in sent[0] for line in text.splitlines()]
    # each caption, with its time into the video, in order (cut only if one were too long)
    assert [line.split("] ", 1)[0] for line in first_level] == [f"[00:0{i // 2}" for i in range(6)]
    assert all(caption.startswith(line.split("] ", 1)[1]) for line, caption in zip(first_level, captions))


async def test_answers_are_summarised_with_the_question_they_answer(redis_url, tmp_path, media, monkeypatch):
    asked: list[str] = []
    real = summaries.JobSummaries._generate

    async def recording(self, texts):
        asked.append(self.instruction)
        return await real(self, texts)

    monkeypatch.setattr(summaries.JobSummaries, "_generate", recording)
    async with serving(summary_settings(redis_url, tmp_path, media)) as (d, client):
        job_id = await submit(client, source=f"file://{media}/clip.mp4", fps=1, model="vlm/vqa",
                              prompt="Is the door open?", summarize={"model": "llm/wide", "prompt": "Say."})
        job = await until_status(client, job_id, "completed", "failed", timeout=60)
        assert job["status"] == "completed", job["error"]
    assert asked and all(a == "Say.\nEach frame's description was made for this prompt: Is the door open?"
                         for a in asked)


async def test_a_live_stream_job_is_summarised_every_period(redis_url, sync_redis, tmp_path, media, gradient):
    async with serving(summary_settings(redis_url, tmp_path, media)) as (d, client):
        job_id = await submit(client, source="redis://cams:{s}", fps=5, max_seconds=8,
                              summarize={"model": "llm/tiny", "every_s": 1, "prompt": "Say."})
        await until_status(client, job_id, "running")
        await asyncio.sleep(0.3)
        ts = int(time.time() * 1000)
        for i in range(3):
            sync_redis.xadd("cams:{s}", {"image": encode(gradient), "ts": ts + 200 * i})

        await wait_for(lambda: sum(s["lines"] for s in summaries_of(sync_redis, job_id)) == 3, 15,
                       "periodic summaries of 3 results")
        first = summaries_of(sync_redis, job_id)[0]
        assert not first["final"] and first["from_s"] == pytest.approx(ts / 1000)
        for i in range(2):
            sync_redis.xadd("cams:{s}", {"image": encode(gradient), "ts": ts + 2000 + 200 * i})
        job = await until_status(client, job_id, "completed", "failed", timeout=20)
        assert job["status"] == "completed", job["error"]
        written = summaries_of(sync_redis, job_id)
        periodic = [s for s in written if not s["final"]]
        # each covers what came since the one before: every result once, in time order
        assert sum(s["lines"] for s in periodic) == 5
        assert all(a["to_s"] < b["from_s"] for a, b in zip(periodic, periodic[1:]))
        assert periodic[-1]["to_s"] == pytest.approx(ts / 1000 + 2.2)
        assert written[-1]["final"] and written[-1]["lines"] == 5 == job["counts"]["processed"]
        assert job["summary"] == written[-1] and job["counts"]["summaries"] == len(written)


async def test_a_job_whose_results_say_nothing_completes_with_an_empty_summary(redis_url, sync_redis, tmp_path,
                                                                                 media):
    """A quiet camera is a normal outcome: the job failed with 'none of the job's results says
    anything to summarise', which hid why (here: no frame came) and lost the job's results."""
    async with serving(summary_settings(redis_url, tmp_path, media)) as (d, client):
        job_id = await submit(client, source="redis://quiet:{q}", model="vlm/tiny", max_seconds=1.5,
                              summarize={"model": "llm/wide"})
        job = await until_status(client, job_id, "completed", "failed", timeout=20)
    assert job["status"] == "completed", job["error"]
    assert job["summary"]["text"] == "" and job["summary"]["lines"] == 0 and job["summary"]["final"]
    assert [s["lines"] for s in summaries_of(sync_redis, job_id)] == [0]


async def test_a_video_that_turns_out_live_is_summarised_every_period(redis_url, sync_redis, tmp_path, media,
                                                                     monkeypatch):
    """A live HLS source with neither summarize.every_s nor an end would never be summarised
    (it ends only when cancelled): it gets summaries every LIVE_EVERY_S."""
    monkeypatch.setattr(summaries, "LIVE_EVERY_S", 1.0)
    hls.make_hls_vod(tmp_path / "live", seconds=20, fps=10)
    with hls.live_hls(tmp_path / "live" / "index.m3u8") as live:
        async with serving(summary_settings(redis_url, tmp_path, media)) as (d, client):
            job_id = await submit(client, source=live.url, fps=2, summarize={"model": "llm/tiny", "prompt": "Say."})

            await wait_for(lambda: len(summaries_of(sync_redis, job_id)) >= 2, 30, "two periodic summaries")
            assert not any(s["final"] for s in summaries_of(sync_redis, job_id))
            job = await (await client.get(f"/jobs/{job_id}")).json()
            assert job["status"] == "running" and job["summary"]["lines"] > 0
            assert (await client.delete(f"/jobs/{job_id}")).status == 200
            await wait_for(lambda: job_id not in d.job_runner.running, 5, "the job to stop")
            count = len(summaries_of(sync_redis, job_id))
            await asyncio.sleep(2.5)  # two periods more: the summaries stopped with the job
            assert len(summaries_of(sync_redis, job_id)) == count


async def test_a_job_waiting_on_a_slow_model_is_not_taken_for_a_silent_source(redis_url, tmp_path, media):
    """A model slower than the source (a captioner on a CPU): reading stops while the job's
    frames in flight are at their cap, which is no source gone quiet (give_up_s)."""
    settings = summary_settings(redis_url, tmp_path, media)
    settings.models["fake"] = {"slow": type(settings.models["tiny"]["det"])(**fake_adapters.entry(delay_s=3))}
    settings = settings.model_copy(update={"jobs": settings.jobs.model_copy(
        update={"give_up_s": 1.5, "max_in_flight": 2})})
    hls.make_hls_vod(tmp_path / "live", seconds=20, fps=10)
    with hls.live_hls(tmp_path / "live" / "index.m3u8") as live:  # frames come in real time
        async with serving(settings) as (d, client):
            job_id = await submit(client, source=live.url, fps=5, max_seconds=6, model="fake/slow",
                                  summarize={"model": "llm/tiny", "prompt": "Say.", "every_s": 1})
            job = await until_status(client, job_id, "completed", "failed", timeout=90)
            assert job["status"] == "completed", job["error"]
            assert job["summary"]["final"] and job["counts"]["summaries"] >= 2


async def test_a_video_that_ends_gets_only_its_final_summary(redis_url, sync_redis, tmp_path, media, monkeypatch):
    monkeypatch.setattr(summaries, "LIVE_EVERY_S", 0.2)
    async with serving(summary_settings(redis_url, tmp_path, media)) as (d, client):
        job_id = await submit(client, source=f"file://{media}/clip.mp4", fps=2,
                              summarize={"model": "llm/tiny", "prompt": "Say."})
        job = await until_status(client, job_id, "completed", "failed", timeout=60)
        assert job["status"] == "completed", job["error"]
        assert [s["final"] for s in summaries_of(sync_redis, job_id)] == [True]


async def test_a_summary_that_cannot_be_written_fails_the_job(redis_url, tmp_path, media):
    async with serving(summary_settings(redis_url, tmp_path, media)) as (d, client):
        job_id = await submit(client, source=f"file://{media}/clip.mp4", fps=2,
                              summarize={"model": "llm/broken", "prompt": "Say."})
        job = await until_status(client, job_id, "completed", "failed", timeout=60)
        assert job["status"] == "failed" and job["summary"] is None
        assert job["error"].startswith("summary: llm/broken: the model failed:"), job["error"]
        assert "the text model broke" in job["error"]
        assert job["counts"]["processed"] == 6  # the per-frame results stay


async def test_summaries_are_refused_with_reasons(redis_url, tmp_path, media):
    async with serving(summary_settings(redis_url, tmp_path, media)) as (d, client):
        source = f"file://{media}/clip.mp4"

        async def refused(status, **body):
            r = await client.post("/jobs", json={"model": "tiny/det", "source": source, **body})
            assert r.status == status, await r.text()
            return (await r.json())["error"]["message"]

        assert "no/such" in await refused(404, summarize={"model": "no/such"})
        assert "does not write text" in await refused(422, summarize={"model": "tiny/det"})
        assert "writes text from text" in await refused(422, model="llm/tiny")
        assert "every_s" in await refused(422, summarize={"model": "llm/tiny", "every_s": 0})
        assert "summarize" in await refused(422, summarize={"model": "llm/tiny", "colour": "red"})
        assert "window (48 tokens)" in await refused(422, summarize={"model": "llm/short"})
        assert "window (128 tokens)" in await refused(422, summarize={"model": "llm/tiny", "prompt": "say " * 100})
        no_end = await refused(422, source="redis://cams:{x}", summarize={"model": "llm/tiny"})
        assert "ends only when cancelled" in no_end
        camera = await refused(422, source="rtsp://127.0.0.1:8554/live", summarize={"model": "llm/tiny"})
        assert "ends only when cancelled" in camera
        # a captioner's folder entered as a text model: refused now, not when the video is done
        not_causal = await refused(422, summarize={"model": "llm/blip"})
        assert "not a causal language model" in not_causal and len(not_causal) < 400
        # BERT's kind has a causal LM class, but this checkpoint is a masked LM: no head to write with
        encoder = await refused(422, summarize={"model": "llm/bert"})
        assert "bert (BertForMaskedLM)" in encoder and "not a causal language model" in encoder
        r = await client.post("/jobs", json={"model": "tiny/det", "source": "redis://cams:{x}", "max_seconds": 5,
                                             "summarize": {"model": "llm/tiny", "prompt": "Say."}})
        assert r.status == 201, await r.text()


async def test_a_text_model_answers_predict_with_text(redis_url, tmp_path, media):
    async with serving(summary_settings(redis_url, tmp_path, media)) as (d, client):
        r = await client.post("/predict/llm/tiny", data=b"a dog walks on the street",
                              params={"prompt": "Summarise."}, headers={"Content-Type": "text/plain"})
        assert r.status == 200, await r.text()
        assert r.headers["X-Task"] == "generate" and isinstance((await r.json())["text"], str)
        answer = await r.json()
        form = FormData()  # as a file (curl -F file=@notes.txt): its content alone is the text
        form.add_field("file", b"a dog walks on the street", filename="notes.txt", content_type="text/plain")
        r = await client.post("/predict/llm/tiny", data=form, params={"prompt": "Summarise."})
        assert r.status == 200 and await r.json() == answer
        form.add_field("file", b"and a cat", filename="more.txt", content_type="text/plain")
        r = await client.post("/predict/llm/tiny", data=form)
        assert r.status == 400 and "one text" in (await r.json())["error"]["message"]
        r = await client.post("/predict/llm/tiny?format=png", data=b"a dog", headers={"Content-Type": "text/plain"})
        assert r.status == 422 and (await r.json())["error"]["code"] == "bad_format"
        r = await client.post("/predict/llm/tiny", data=b"  ", headers={"Content-Type": "text/plain"})
        assert r.status == 400 and "send the text" in (await r.json())["error"]["message"]
        r = await client.post("/predict/llm/tiny", data=b"\xff\xfe", headers={"Content-Type": "text/plain"})
        assert r.status == 400 and "UTF-8" in (await r.json())["error"]["message"]
        r = await client.post("/predict/llm/tiny", data="word " * 500, headers={"Content-Type": "text/plain"})
        assert r.status == 422 and "context of 128 tokens" in (await r.json())["error"]["message"]


async def test_frames_go_on_while_a_text_call_runs_on_their_device(redis_url, sync_redis, tmp_path, media,
                                                                 gradient, monkeypatch):
    """A text model's call takes minutes on a CPU; the one device's pipeline frames and
    /predict of images are answered meanwhile (text models have their own worker), and text
    calls still wait for each other."""
    import threading

    from sightstream.models.adapters.hf_text import HfTextGenerator

    real, began, release = HfTextGenerator.infer, threading.Event(), threading.Event()
    threads: list[str] = []

    def held(self, inputs):
        threads.append(threading.current_thread().name)
        began.set()
        release.wait(60)
        return real(self, inputs)

    monkeypatch.setattr(HfTextGenerator, "infer", held)
    async with serving(summary_settings(redis_url, tmp_path, media)) as (d, client):
        text = asyncio.ensure_future(client.post("/predict/llm/tiny", data=b"a dog walks",
                                                 headers={"Content-Type": "text/plain"}))
        assert await asyncio.to_thread(began.wait, 30), "the text call did not start"
        try:
            r = await asyncio.wait_for(client.post("/predict/tiny/det", data=encode(gradient),
                                                   headers={"Content-Type": "image/jpeg"}), 30)
            assert r.status == 200, await r.text()
            sync_redis.xadd("frames:{m}", {"image": encode(gradient)})
            await wait_for(lambda: sync_redis.xlen("results:people:frames:{m}") == 1)
            second = asyncio.ensure_future(client.post("/predict/llm/tiny", data=b"a cat sleeps",
                                                       headers={"Content-Type": "text/plain"}))
            await asyncio.sleep(0.5)
            assert threads == ["text-cpu_0"] and not second.done()  # queued behind the first
            health = await (await client.get("/health")).json()
            assert [(w["kind"], w["busy"]) for w in health["workers"]] == [("frames", False), ("text", True)]
        finally:
            release.set()
        for call in (text, second):
            r = await call
            assert r.status == 200 and isinstance((await r.json())["text"], str), await r.text()
        assert threads == ["text-cpu_0", "text-cpu_0"]


async def test_a_stop_publishes_the_frames_results_though_text_calls_wait(redis_url, sync_redis, tmp_path, media,
                                                                         gradient, monkeypatch):
    """One text call running and one queued (the text queue full): the stop still drains the
    frames and ends the publisher in order, then gives the text calls what time is left."""
    import threading

    from sightstream.models.adapters.hf_text import HfTextGenerator

    began, release = threading.Event(), threading.Event()
    monkeypatch.setattr(HfTextGenerator, "infer", lambda self, inputs: (began.set(), release.wait(30)) and [])
    settings = summary_settings(redis_url, tmp_path, media).model_copy(update={"shutdown_timeout_s": 3})
    try:
        async with serving(settings) as (d, client):
            def ask(text: str) -> asyncio.Future:
                return asyncio.ensure_future(client.post("/predict/llm/tiny", data=text.encode(),
                                                         headers={"Content-Type": "text/plain"}))

            calls = [ask("a dog")]
            assert await asyncio.to_thread(began.wait, 30)
            calls.append(ask("a cat"))  # a batch of its own, queued behind the first
            await wait_for(lambda: d._text_batches.full(), 10, "the second text call queued")
            sync_redis.xadd("frames:{m}", {"image": encode(gradient)})
            await wait_for(lambda: sync_redis.xlen("results:people:frames:{m}") == 1)
            await d.stop()
            assert d._publisher_task.done() and not d._publisher_task.cancelled()  # drained, not cut off
            # Both were answered (503), though neither call ended: the control plane's server
            # waits for its handlers before it closes (the process lingered 60 s)
            answers = await asyncio.wait_for(asyncio.gather(*calls), 5)
            assert [r.status for r in answers] == [503, 503]
    finally:
        release.set()


async def test_the_text_model_is_unloaded_and_evicted_like_any_model(redis_url, tmp_path, media):
    """A captioner and the text model on one device whose budget holds one of them at a time:
    each load evicts the other while it is idle, and a job with a summary still completes."""
    async with serving(summary_settings(redis_url, tmp_path, media)) as (d, client):
        sizes = {}
        for model in ("vlm/tiny", "llm/tiny"):
            r = await client.post(f"/models/{model}/load?device=cpu")
            assert r.status == 200, await r.text()
            sizes[model] = (await r.json())["memory_mb"]
        r = await client.post("/models/llm/tiny/unload")
        assert r.status == 200, await r.text()
        loaded = (await (await client.get("/models/loaded")).json())["models"]
        assert [m["model"] for m in loaded if m["model"] != "tiny/det"] == ["vlm/tiny"]  # the pipeline's: at start

        d.manager.budgets_mb["cpu"] = max(sizes.values()) + min(sizes.values()) / 2
        r = await client.post("/predict/llm/tiny", data=b"a dog", headers={"Content-Type": "text/plain"})
        assert r.status == 200, await r.text()
        loaded = (await (await client.get("/models/loaded")).json())["models"]
        assert [m["model"] for m in loaded] == ["llm/tiny"]  # the idle captioner made room

        job_id = await submit(client, source=f"file://{media}/clip.mp4", fps=2, model="vlm/tiny",
                              summarize={"model": "llm/tiny", "prompt": "Say."})
        job = await until_status(client, job_id, "completed", "failed", timeout=90)
        assert job["status"] == "completed" and job["summary"]["lines"] == 6, job["error"]
        loaded = (await (await client.get("/models/loaded")).json())["models"]
        assert [m["model"] for m in loaded] == ["llm/tiny"]  # it wrote last


async def test_a_pipeline_cannot_read_frames_with_a_text_model(redis_url, tmp_path, media):
    settings = summary_settings(redis_url, tmp_path, media)
    settings = settings.model_copy(update={"pipelines": [
        settings.pipelines[0].model_copy(update={"model": "llm/tiny"})]})
    with pytest.raises(ConfigError, match="writes text from text"):
        async with running(settings):
            pass


async def test_summary_writes_are_fenced_and_final_once(redis_url, sync_redis):
    client = make_client(redis_url)
    store = JobStore(client, 60)
    try:
        job = await store.create(JobSpec("redis://cams:{x}", "tiny/det", summarize={"model": "llm/tiny", "prompt": "Say."}))
        lease = Lease(client, keys.job_lease(job.id), 60_000)
        assert await lease.acquire()
        assert (await store.start(job.id, lease.token, "a"))[0]

        async def write(final, upto, token=lease.token):
            return await store.write_summary(job, token, final, upto, {"text": upto}, 0,
                                             {"task": "summary", "result": "{}"})

        assert await write(False, "5-0") == 1
        assert await write(False, "5-0") == 0  # covers nothing newer
        assert await write(False, "4-9") == 0
        assert await write(False, "10-0") == 1  # numbers, not strings: 10 > 5
        assert await write(True, "10-0") == 1
        assert await write(True, "11-0") == 0  # the final summary, once (a resumed job)
        assert await write(False, "12-0", token="stolen") == -1
        stored = await store.get(job.id)
        assert stored.summary == {"text": "10-0"} and stored.summary_upto == "10-0"
        assert stored.counts["summaries"] == 3 and sync_redis.xlen(keys.job_results(job.id)) == 3
    finally:
        await client.aclose(close_connection_pool=True)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_the_text_model_batches_in_each_precision(dtype, media, gradient):
    import torch

    from sightstream.errors import ModelError
    from sightstream.models.adapter import Prompt, predict
    from sightstream.models.adapters.hf_text import HfTextGenerator

    model = HfTextGenerator(str(media / "lm"), {"max_new_tokens": 4, "dtype": dtype})
    model.load("cpu")
    assert model._model.dtype == getattr(torch, dtype)
    out = predict(model, ["a dog", "a red car parks next to a building"], Prompt("Say.", 1))
    assert len(out) == 2 and all(isinstance(p.result["text"], str) for p in out)
    with pytest.raises(ModelError, match="takes text, not images"):
        predict(model, [gradient], None)


def test_a_text_model_s_call_may_take_minutes_unless_its_entry_says_otherwise(media):
    from types import SimpleNamespace

    from sightstream.config import ModelEntry
    from sightstream.models.catalogue import Catalogue
    from sightstream.models.manager import ModelManager

    path = str(media / "lm")
    manager = ModelManager(Catalogue({"llm": {
        "slow": ModelEntry(backend="transformers", task="generate", path=path),
        "quick": ModelEntry(backend="transformers", task="generate", path=path, timeout_s=30)}}))
    slow, quick = manager.create("llm/slow"), manager.create("llm/quick")
    # not inference_timeout_s (60): a window takes minutes on a CPU; a longer daemon-wide one stands
    assert manager.timeout_s("llm/slow", slow, 60) == 600 and manager.timeout_s("llm/slow", slow, 900) == 900
    assert manager.timeout_s("llm/quick", quick, 900) == 30  # the entry's own, as set
    # a plug-in text model gets the same; a plug-in's call_timeout_s that is no number is ignored
    assert manager.timeout_s("llm/slow", SimpleNamespace(task="generate"), 60) == 600
    assert manager.timeout_s("llm/slow", SimpleNamespace(task="generate", call_timeout_s=120), 60) == 600
    assert manager.timeout_s("llm/slow", SimpleNamespace(task="detect", call_timeout_s="soon"), 60) == 60
    assert manager.timeout_s("llm/slow", SimpleNamespace(task="detect", call_timeout_s=120), 60) == 120


def test_the_budget_counts_the_template_and_the_instruction(media):
    from sightstream.models.adapters.hf_text import HfTextGenerator

    chat = HfTextGenerator(str(media / "lm"), {"max_new_tokens": 8}).budget("Say.")
    plain = HfTextGenerator(str(media / "lm_plain"), {"max_new_tokens": 8}).budget("Say.")
    assert chat.context_tokens == plain.context_tokens == 128  # from the config, weights not loaded
    assert chat.overhead > plain.overhead > 0  # the chat turn's tokens
    assert chat.room == 128 - 8 - chat.overhead
    assert HfTextGenerator(str(media / "lm"), {"context_tokens": 64}).budget().context_tokens == 64


async def test_the_summarize_command_follows_the_job_and_prints_the_summary(redis_url, tmp_path, media, capsys):
    from sightstream import cli
    from sightstream.summarize import summarize

    async with serving(summary_settings(redis_url, tmp_path, media)) as (d, client):
        base = str(client.make_url("")).rstrip("/")
        printed: list[str] = []
        assert await asyncio.to_thread(summarize, base, "", str(media / "clip.mp4"), "tiny/det", "llm/tiny",
                                       summary_prompt="Say.", fps=2, as_json=True, emit=printed.append) == 0
        job = json.loads(printed.pop())
        assert job["status"] == "completed" and job["source"] == f"file://{media}/clip.mp4"
        assert job["summary"]["final"] and job["summary"]["lines"] == 6
        err = capsys.readouterr().err
        assert "100%" in err and "6 frames, completed" in err  # the progress bar, on stderr
        assert await asyncio.to_thread(summarize, base, "", str(media / "clip.mp4"), "tiny/det", "llm/tiny",
                                       summary_prompt="Say.", fps=2, progress=False, emit=printed.append) == 0
        assert isinstance(printed.pop(), str) and capsys.readouterr().err == ""  # the summary's text alone
        from sightstream.status import status

        assert await asyncio.to_thread(status, base, "", False, printed.append) == 0
        assert f"summary of job {job['job_id']}: " in printed.pop()
        args = ["summarize", str(media / "clip.mp4"), "--model", "tiny/det"]
        code = await asyncio.to_thread(cli.main, ["summarize", "/etc/hostname", "--model", "tiny/det",
                                                  "--summary-model", "llm/tiny", "--url", base, "-q"])
        assert code == 1 and "put it under its jobs.allowed_paths" in capsys.readouterr().err
        code = await asyncio.to_thread(cli.main, [*args, "--summary-model", "tiny/det", "--url", base, "-q"])
        assert code == 1 and "does not write text" in capsys.readouterr().err
        code = await asyncio.to_thread(cli.main, [*args, "--url", base, "-q"])  # the built-in text model …
        err = capsys.readouterr().err
        assert code == 1 and "qwen2_5/0.5b-instruct" in err and "cache" in err, err  # … not cached here


async def test_the_summarize_command_prints_a_live_source_s_summaries_as_they_come(redis_url, sync_redis, tmp_path,
                                                                                 media, capsys):
    from sightstream import cli

    hls.make_hls_vod(tmp_path / "live", seconds=30, fps=10)
    with hls.live_hls(tmp_path / "live" / "index.m3u8") as live:
        async with serving(summary_settings(redis_url, tmp_path, media)) as (d, client):
            base = str(client.make_url("")).rstrip("/")
            code = await asyncio.to_thread(cli.main, [
                "summarize", live.url, "--model", "tiny/det", "--summary-model", "llm/tiny", "--fps", "2",
                "--every", "1", "--max-seconds", "6", "--summary-prompt", "Say.", "--url", base])
            out, err = capsys.readouterr()  # the daemon's own log lines are in `out` too
            assert code == 0, err
            job = (await (await client.get("/jobs?limit=1")).json())["jobs"][0]
            assert job["summarize"]["every_s"] == 1 and job["max_seconds"] == 6
            assert job["status"] == "completed" and job["summary"]["final"]
            # each periodic summary once, in order, with the times it covers, then the final one's text
            periodic = [s for s in summaries_of(sync_redis, job["job_id"]) if not s["final"]]
            printed = [line for line in out.splitlines() if line.startswith("[00:0")]
            assert len(periodic) >= 2 and len(printed) == len(periodic), out
            assert all(s["text"].startswith(line.split("] ", 1)[1]) for line, s in zip(printed, periodic))
            assert out.index(printed[-1]) < out.rindex(job["summary"]["text"])
            assert ", at 00:0" in err  # a live source has no length: the bar shows its position

            code = await asyncio.to_thread(cli.main, [  # --json: one object per line, the job last
                "summarize", live.url, "--model", "tiny/det", "--summary-model", "llm/tiny", "--fps", "2",
                "--every", "1", "--max-seconds", "4", "--summary-prompt", "Say.", "--url", base, "--json", "-q"])
            out, err = capsys.readouterr()
            assert code == 0, err
            objects = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            assert len(objects) >= 2 and all("from_s" in o and not o["final"] for o in objects[:-1])
            assert objects[-1]["status"] == "completed" and objects[-1]["summary"]["final"]


def _interrupted_after_follow_starts(command):
    def interrupted(base, token, job_id, progress, periodic):
        raise KeyboardInterrupt
    return "_follow", interrupted


def _interrupted_once_submitted(command):
    """Ctrl-C after the daemon made the job, before its id came back."""
    real = command._submit

    def made_then_interrupted(base, token, body, submission):
        real(base, token, body, submission)
        raise KeyboardInterrupt
    return "_submit", made_then_interrupted


@pytest.mark.parametrize("interrupt", [_interrupted_after_follow_starts, _interrupted_once_submitted],
                         ids=["while following", "during submission"])
async def test_interrupting_the_summarize_command_cancels_its_job(redis_url, tmp_path, media, monkeypatch,
                                                                  interrupt):
    """Ctrl-C cancels the one job, also when it came during the submission: its Idempotency-Key
    finds the job; no second job is left running."""
    from sightstream import summarize as command

    monkeypatch.setattr(command, *interrupt(command))
    async with serving(summary_settings(redis_url, tmp_path, media)) as (d, client):
        base = str(client.make_url("")).rstrip("/")
        with pytest.raises(KeyboardInterrupt):
            await asyncio.to_thread(command.summarize, base, "", str(media / "clip.mp4"), "tiny/det", "llm/tiny",
                                    summary_prompt="Say.")
        (job,) = (await (await client.get("/jobs")).json())["jobs"]
        assert job["status"] == "cancelled"


async def test_a_resumed_job_does_not_summarise_again_and_a_lost_lease_stops_the_summary(
        redis_url, sync_redis, tmp_path, media):
    from sightstream.errors import SightstreamError
    from sightstream.jobs.run import JobStopped
    from sightstream.jobs.summaries import JobSummaries

    client = make_client(redis_url)
    store = JobStore(client, 60)
    try:
        job = await store.create(JobSpec("file:///v.mp4", "tiny/det", summarize={"model": "llm/tiny", "prompt": "Say."}))
        lease = Lease(client, keys.job_lease(job.id), 60_000)
        assert await lease.acquire() and (await store.start(job.id, lease.token, "a"))[0]
        sync_redis.xadd(keys.job_results(job.id), {"task": "detect", "pts_ms": "0",
                                                    "result": json.dumps({"detections": []})})

        class Batcher:  # the text model's answers, without a daemon
            calls = 0

            async def submit(self, frames, *args):
                from sightstream.frames import Published

                Batcher.calls += 1
                return [Published(f, "", {"result": json.dumps({"text": "ok"})}) for f in frames]

        settings = summary_settings(redis_url, tmp_path, media)
        from sightstream.models.catalogue import Catalogue
        from sightstream.models.manager import ModelManager

        create = ModelManager(Catalogue(settings.models)).create
        ours = JobSummaries(await store.get(job.id), store, lease.token, client, Batcher(), create, 0)
        assert (await ours.write(final=True))["text"] == "ok" and Batcher.calls == 1
        resumed = JobSummaries(await store.get(job.id), store, lease.token, client, Batcher(), create, 0)
        assert resumed.job.summary_final
        assert await resumed.write(final=True) is None and Batcher.calls == 1  # not recomputed
        assert await resumed.write(final=False) is None  # nothing after the final one

        job2 = await store.create(JobSpec("file:///v.mp4", "tiny/det", summarize={"model": "llm/tiny", "prompt": "Say."}))
        lease2 = Lease(client, keys.job_lease(job2.id), 60_000)
        assert await lease2.acquire() and (await store.start(job2.id, lease2.token, "a"))[0]
        sync_redis.xadd(keys.job_results(job2.id), {"task": "detect", "pts_ms": "0",
                                                     "result": json.dumps({"detections": []})})
        lost = JobSummaries(await store.get(job2.id), store, "not-the-token", client, Batcher(), create, 0)
        with pytest.raises(JobStopped, match="lease was lost"):
            await lost.write(final=True)
        assert await store.cancel(job2.id) == "running"
        cancelled = JobSummaries(await store.get(job2.id), store, lease2.token, client, Batcher(), create, 0)
        with pytest.raises(JobStopped, match="no longer running"):
            await cancelled.write(final=True)

        class Flaky(JobSummaries):  # a periodic summary that fails goes on to the next period
            tries = 0

            async def write(self, final):
                Flaky.tries += 1
                if Flaky.tries == 1:
                    raise SightstreamError("Redis went away (simulated)")
                raise JobStopped("done")

        periodic = Flaky(await store.get(job.id), store, lease.token, client, Batcher(), create, 0)
        periodic.every_s = 0.01
        await asyncio.wait_for(periodic.periodic(), 5)
        assert Flaky.tries == 2
    finally:
        await client.aclose(close_connection_pool=True)


def test_the_summarize_command_with_no_daemon_fails_at_once():
    """Refused: the request never left, so it is not retried (a cut-off one would be)."""
    import time

    from sightstream.control_client import Unanswered
    from sightstream.daemon.embedded_redis import free_port
    from sightstream.summarize import summarize

    started = time.monotonic()
    with pytest.raises(Unanswered, match="no sightstream control plane answers") as e:
        summarize(f"http://127.0.0.1:{free_port()}", "", "http://cams.example/a.mp4", "tiny/det", "llm/tiny")
    assert not e.value.maybe_arrived and time.monotonic() - started < 2
