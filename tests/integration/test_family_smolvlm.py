"""SmolVLM (Idefics3 classes) and SmolVLM2 (SmolVLM classes) through the `hf_smolvlm` adapter:
tiny random-init models built offline (tests/tiny_smolvlm.py), through the real pipeline (real
Redis) and through `predict`."""

from __future__ import annotations

import json
import shutil

import pytest

from sightstream.errors import ModelError
from sightstream.models.adapter import Prompt, predict
from sightstream.models.adapters import adapter_class, check_prompt
from tests import tiny_smolvlm
from tests.conftest import encode
from tests.integration.helpers import entries, running, wait_for
from tests.integration.test_families import process, run_family

pytestmark = pytest.mark.integration

QUESTION = "what is in the image?"


@pytest.fixture(scope="session")
def smolvlm_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("smolvlm")
    return {"smolvlm": tiny_smolvlm.smolvlm(root / "smolvlm"), "smolvlm2": tiny_smolvlm.smolvlm2(root / "smolvlm2")}


def loaded(folder, **options):
    adapter = adapter_class("hf_smolvlm")(str(folder), {"max_new_tokens": 6, **options})
    adapter.load("cpu")
    return adapter


@pytest.mark.parametrize("family,task,prompt", [
    ("smolvlm", "caption", ""), ("smolvlm", "vqa", QUESTION), ("smolvlm2", "vqa", QUESTION),
])
async def test_smolvlm_through_the_pipeline(family, task, prompt, smolvlm_models, redis_url, sync_redis, tmp_path,
                                            gradient, astronaut):
    images = [encode(gradient), encode(astronaut)]
    settings = run_family(redis_url, sync_redis, tmp_path,
                          {"backend": "transformers", "task": task, "adapter": "hf_smolvlm",
                           "path": str(smolvlm_models[family]), "max_new_tokens": 5}, images, prompt=prompt)
    results = await process(settings, sync_redis, 2)
    for _, f in results:
        assert f["task"] == task.encode() and f["model"] == b"user/model" and f["prompt_version"] == b"1"
        r = json.loads(f["result"])
        assert set(r) == {"text"} and isinstance(r["text"], str)
        assert "Assistant" not in r["text"] and QUESTION not in r["text"]  # only the new tokens


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("family", ["smolvlm", "smolvlm2"])
def test_smolvlm_runs_in_half_precision(family, dtype, smolvlm_models, gradient, astronaut):
    import torch

    adapter = loaded(smolvlm_models[family], task="vqa", dtype=dtype)
    assert adapter._model.dtype == getattr(torch, dtype) and adapter.memory_mb > 0
    out = predict(adapter, [gradient, astronaut], Prompt(QUESTION, 1))
    assert len(out) == 2 and all(isinstance(p.result["text"], str) for p in out)
    adapter.unload()
    assert adapter._model is None


def test_a_vqa_model_without_a_question_is_refused(smolvlm_models, gradient):
    with pytest.raises(ModelError, match="needs a question"):
        check_prompt("hf_smolvlm", "vqa", "  ")  # a prompt set through the control plane
    check_prompt("hf_smolvlm", "caption", "")  # captions ask their own question
    adapter = loaded(smolvlm_models["smolvlm"], task="vqa")
    for prompt in (None, Prompt("", 1), Prompt(" \n", 2)):
        with pytest.raises(ModelError, match="needs a question"):
            predict(adapter, [gradient], prompt)


async def test_a_vqa_pipeline_without_a_question_dead_letters_with_a_reason(smolvlm_models, redis_url, sync_redis,
                                                                            tmp_path, gradient):
    settings = run_family(redis_url, sync_redis, tmp_path,
                          {"backend": "transformers", "task": "vqa", "adapter": "hf_smolvlm",
                           "path": str(smolvlm_models["smolvlm"])}, [encode(gradient)])
    async with running(settings):
        await wait_for(lambda: sync_redis.xlen("deadletter:people:frames:{f}") == 1, 60)
    (_, dead), = entries(sync_redis, "deadletter:people:frames:{f}")
    assert dead["reason"] == b"model_error" and b"needs a question" in dead["error"]


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("family", ["smolvlm", "smolvlm2"])
def test_a_batch_of_images_of_different_sizes(family, split, smolvlm_models, gradient, astronaut):
    images = [gradient, astronaut, astronaut[:200, :100], astronaut[:40, :300]]
    adapter = loaded(smolvlm_models[family], task="vqa", do_image_splitting=split)
    prepared = adapter.prepare(images, Prompt(QUESTION, 1), None)
    pixels = prepared.tensors["pixel_values"]
    tile = tiny_smolvlm.TILE
    # One tile per image, or the tiles of each (up to 2 x 2 at the tiny model's 128-px longest
    # edge) and the whole image, padded to the batch's most.
    assert tuple(pixels.shape) == (4, 5 if split else 1, 3, tile, tile)
    ids = adapter.infer(prepared)
    assert ids.shape[1] - prepared.tensors["input_ids"].shape[1] <= 6  # max_new_tokens
    batch = adapter.finish(prepared, ids)
    assert len(batch) == 4 and all(isinstance(p.result["text"], str) for p in batch)
    # Left padding: each image's answer is the one it gets alone (greedy, float32).
    assert [p.result["text"] for p in batch] == [predict(adapter, [i], Prompt(QUESTION, 1))[0].result["text"]
                                                 for i in images]


def test_tiling_is_bounded_by_the_longest_edge_option(smolvlm_models, astronaut):
    adapter = loaded(smolvlm_models["smolvlm"], task="caption", do_image_splitting=True,
                     longest_edge=tiny_smolvlm.TILE)
    prepared = adapter.prepare([astronaut], None, None)
    assert prepared.tensors["pixel_values"].shape[1] == 1  # one tile: the whole image


def test_the_caption_question_and_the_fallback_turn(smolvlm_models, tmp_path, gradient):
    adapter = loaded(smolvlm_models["smolvlm"], task="caption", caption_question="Name one colour.")
    prompt = adapter._processor.tokenizer.decode(adapter.prepare([gradient], None, None).tensors["input_ids"][0])
    assert prompt.startswith("<|im_start|>User:<fake_token_around_image><global-img><image>")
    assert prompt.endswith("Name one colour.<end_of_utterance>\nAssistant:")
    # A folder without a chat template gets SmolVLM's turn all the same.
    bare = shutil.copytree(smolvlm_models["smolvlm"], tmp_path / "bare")
    (bare / "chat_template.jinja").unlink()
    adapter = loaded(bare, task="caption", caption_question="Name one colour.")
    assert adapter._processor.chat_template is None
    ids = adapter.prepare([gradient], None, None).tensors["input_ids"][0]
    assert adapter._processor.tokenizer.decode(ids) == prompt
