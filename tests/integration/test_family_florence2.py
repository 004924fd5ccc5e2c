"""Florence-2 (transformers' native classes) through the real pipeline with a tiny random-init
model built offline (tests/tiny_florence2.py), and its output parsing on crafted generations:
a random model's tokens say nothing, so the mapping of `<loc_N>` bins to pixels is checked on
text written here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sightstream.errors import ModelError
from sightstream.models.adapter import Prompt, predict
from sightstream.models.adapters import check_prompt
from sightstream.models.adapters.hf_common import Inputs
from sightstream.models.adapters.hf_florence2 import HfFlorence2, detections
from tests import tiny_florence2
from tests.conftest import encode
from tests.integration.helpers import entries, running, wait_for
from tests.integration.test_families import process, run_family

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def florence(tmp_path_factory):
    return tiny_florence2.florence2(tmp_path_factory.mktemp("florence2") / "tiny")


@pytest.fixture(scope="module")
def detector(florence):
    adapter = HfFlorence2(str(florence), {"task": "detect"})
    adapter.load("cpu")
    return adapter


def entry(florence, task: str, **options) -> dict:
    return {"backend": "transformers", "task": task, "adapter": "hf_florence2", "path": str(florence),
            **options}


def bin_px(b: int, side: int) -> float:
    """Where Florence-2's location bin b (of 1000) lands in pixels: its centre, truncated."""
    return float(int((b + 0.5) * side / 1000))


@pytest.mark.parametrize("prompt", ["", "<OCR>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>"])
async def test_captions_through_the_pipeline(prompt, florence, redis_url, sync_redis, tmp_path, gradient, astronaut):
    settings = run_family(redis_url, sync_redis, tmp_path, entry(florence, "caption", max_new_tokens=6),
                          [encode(gradient), encode(astronaut)], prompt=prompt)
    results = await process(settings, sync_redis, 2)
    for _, f in results:
        assert f["task"] == b"caption" and f["model"] == b"user/model" and f["prompt_version"] == b"1"
        r = json.loads(f["result"])
        assert set(r) == {"text"} and isinstance(r["text"], str)


@pytest.mark.parametrize("prompt", ["", "<OD>", "<DENSE_REGION_CAPTION>", "<REGION_PROPOSAL>", "<OCR_WITH_REGION>",
                                    "<OPEN_VOCABULARY_DETECTION>person", "a red car",
                                    "<CAPTION_TO_PHRASE_GROUNDING>a red car"])
async def test_detections_through_the_pipeline(prompt, florence, redis_url, sync_redis, tmp_path, gradient,
                                               astronaut):
    images = [encode(gradient), encode(astronaut), encode(np.ascontiguousarray(astronaut[:200, :100]))]
    settings = run_family(redis_url, sync_redis, tmp_path, entry(florence, "detect", max_new_tokens=40),
                          images, prompt=prompt)
    results = await process(settings, sync_redis, 3)  # three sizes, one batch
    seen = set()
    for _, f in results:
        assert f["task"] == b"detect" and f["prompt_version"] == b"1"
        r = json.loads(f["result"])
        seen.add((r["width"], r["height"]))
        assert isinstance(r["detections"], list)
        names: list[str] = []
        for det in r["detections"]:
            x1, y1, x2, y2 = det["box"]
            assert 0 <= x1 <= x2 <= r["width"] and 0 <= y1 <= y2 <= r["height"]
            assert det["score"] == 1.0 and isinstance(det["label"], str) and det["label"]
            names += [det["label"]] if det["label"] not in names else []
            assert det["class_id"] == names.index(det["label"])  # in the order first seen
            if prompt == "<OCR_WITH_REGION>":
                assert det["label"] == "text" and len(det["polygon"]) == 4 and isinstance(det["text"], str)
        if prompt == "<OCR_WITH_REGION>":
            assert r["text"] == "\n".join(d["text"] for d in r["detections"])
    assert seen == {(96, 64), (512, 512), (100, 200)}


def test_boxes_map_from_location_bins_to_each_images_pixels(detector):
    """Crafted generations, padded as a batch is: each image's own width and height scale its bins."""
    tok = detector._processor.tokenizer
    texts = ["</s><s>car<loc_100><loc_200><loc_300><loc_400>person<loc_0><loc_0><loc_999><loc_999>"
             "car<loc_510><loc_520><loc_530><loc_540></s>",
             "</s><s>car<loc_100><loc_200><loc_300><loc_400></s>"]
    ids = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")["input_ids"]
    assert (ids[1] == tok.pad_token_id).any()
    inputs = Inputs({}, [(64, 96), (300, 500)], {"token": "<OD>"})
    first, second = (p.result for p in detector.finish(inputs, ids))
    assert (first["width"], first["height"]) == (96, 64)
    assert first["detections"] == [
        {"box": [bin_px(100, 96), bin_px(200, 64), bin_px(300, 96), bin_px(400, 64)], "score": 1.0,
         "label": "car", "class_id": 0},
        {"box": [0.0, 0.0, 95.0, 63.0], "score": 1.0, "label": "person", "class_id": 1},
        {"box": [bin_px(510, 96), bin_px(520, 64), bin_px(530, 96), bin_px(540, 64)], "score": 1.0,
         "label": "car", "class_id": 0},
    ]
    assert first["detections"][0]["box"] == [9.0, 12.0, 28.0, 25.0]
    assert second == {"width": 500, "height": 300, "detections": [
        {"box": [50.0, 60.0, 150.0, 120.0], "score": 1.0, "label": "car", "class_id": 0}]}


def test_ocr_with_regions_gives_lines_with_their_corners(detector):
    text = ("</s><s>HELLO<loc_100><loc_100><loc_200><loc_100><loc_200><loc_200><loc_100><loc_200>"
            "EXIT 2<loc_300><loc_600><loc_500><loc_600><loc_500><loc_700><loc_300><loc_700></s>")
    r = detections(detector._processor, text, "<OCR_WITH_REGION>", 1000, 500).result
    assert r == {"width": 1000, "height": 500, "text": "HELLO\nEXIT 2", "detections": [
        {"box": [100.0, 50.0, 200.0, 100.0], "score": 1.0, "label": "text", "class_id": 0, "text": "HELLO",
         "polygon": [[100.0, 50.0], [200.0, 50.0], [200.0, 100.0], [100.0, 100.0]]},
        {"box": [300.0, 300.0, 500.0, 350.0], "score": 1.0, "label": "text", "class_id": 0, "text": "EXIT 2",
         "polygon": [[300.0, 300.0], [500.0, 300.0], [500.0, 350.0], [300.0, 350.0]]},
    ]}


@pytest.mark.parametrize("token,text,expected", [
    ("<CAPTION_TO_PHRASE_GROUNDING>",
     "</s><s>red car<loc_100><loc_200><loc_300><loc_400><loc_500><loc_600><loc_700><loc_800>sky<loc_0><loc_0><loc_999><loc_299></s>",
     [([100, 200, 300, 400], "red car", 0), ([500, 600, 700, 800], "red car", 0), ([0, 0, 999, 299], "sky", 1)]),
    ("<REGION_PROPOSAL>", "</s><s><loc_100><loc_200><loc_300><loc_400><loc_10><loc_20><loc_30><loc_40></s>",
     [([100, 200, 300, 400], "region", 0), ([10, 20, 30, 40], "region", 0)]),
    ("<DENSE_REGION_CAPTION>", "</s><s>a man in a white suit<loc_10><loc_20><loc_30><loc_40></s>",
     [([10, 20, 30, 40], "a man in a white suit", 0)]),
    ("<OPEN_VOCABULARY_DETECTION>", "</s><s>person<loc_10><loc_20><loc_30><loc_40></s>",
     [([10, 20, 30, 40], "person", 0)]),
    # a generation cut short: no box without its four bins, no bin left in a label
    ("<OD>", "</s><s>car<loc_1><loc_2>dog<loc_10><loc_20><loc_30><loc_40>cat<loc_5>", [([10, 20, 30, 40], "dog", 0)]),
])
def test_each_detect_task_parses_to_boxes(detector, token, text, expected):
    r = detections(detector._processor, text, token, 1000, 1000).result
    got = [(d["box"], d["label"], d["class_id"]) for d in r["detections"]]
    assert got == [([float(v) for v in box], label, cid) for box, label, cid in expected]


def test_open_vocabulary_polygons_give_their_box(detector):
    text = "</s><s>car<poly><loc_100><loc_200><loc_300><loc_200><loc_300><loc_400></poly></s>"
    (det,) = detections(detector._processor, text, "<OPEN_VOCABULARY_DETECTION>", 1000, 1000).result["detections"]
    assert det["box"] == [100.0, 200.0, 300.0, 400.0] and det["label"] == "car"
    assert det["polygons"] == [[[100.0, 200.0], [300.0, 200.0], [300.0, 400.0]]]


def test_captions_drop_special_tokens_and_padding(florence):
    adapter = HfFlorence2(str(florence), {"task": "caption"})
    adapter.load("cpu")
    tok = adapter._processor.tokenizer
    ids = tok(["</s><s>a red car on the street</s>", "</s><s>a dog<loc_5></s>"], add_special_tokens=False,
              padding=True, return_tensors="pt")["input_ids"]
    out = adapter.finish(Inputs({}, [(64, 96), (64, 96)], {"token": "<CAPTION>"}), ids)
    assert [p.result for p in out] == [{"text": "a red car on the street"}, {"text": "a dog"}]


def test_plain_text_on_a_detect_entry_is_phrase_grounding(detector, gradient):
    inputs = detector.prepare([gradient], Prompt("a red car", 1))
    assert inputs.extra["token"] == "<CAPTION_TO_PHRASE_GROUNDING>"
    asked = detector._processor.tokenizer.decode(inputs.tensors["input_ids"][0], skip_special_tokens=True)
    assert asked == "Locate the phrases in the caption: a red car"
    assert detector.prepare([gradient], Prompt("<OPEN_VOCABULARY_DETECTION> person", 1)).extra["token"] == \
        "<OPEN_VOCABULARY_DETECTION>"
    (r,) = predict(detector, [gradient], Prompt("a red car", 1))
    assert (r.result["width"], r.result["height"]) == (96, 64)


@pytest.mark.parametrize("task,prompt", [
    ("caption", ""), ("caption", "<CAPTION>"), ("caption", "<DETAILED_CAPTION>"), ("caption", " <OCR> "),
    ("caption", "<MORE_DETAILED_CAPTION>"), ("detect", ""), ("detect", "<OD>"), ("detect", "<DENSE_REGION_CAPTION>"),
    ("detect", "<REGION_PROPOSAL>"), ("detect", "<OCR_WITH_REGION>"), ("detect", "a red car. a dog"),
    ("detect", "<CAPTION_TO_PHRASE_GROUNDING>a red car"), ("detect", "<OPEN_VOCABULARY_DETECTION> person"),
])
def test_prompts_each_entry_takes(task, prompt):
    check_prompt("hf_florence2", task, prompt)


@pytest.mark.parametrize("task,prompt,message", [
    ("caption", "<OD>", '<OD> gives boxes, and this is a caption model: use <OD> with a Florence-2 entry of task = "detect"'),
    ("caption", "<OCR_WITH_REGION>", "<OCR_WITH_REGION> gives boxes, and this is a caption model"),
    ("detect", "<CAPTION>", '<CAPTION> gives text, and this is a detect model: use <CAPTION> with a Florence-2 entry of task = "caption"'),
    ("detect", "<OCR>", "<OCR> gives text, and this is a detect model"),
    ("detect", "<FOO>", "unknown Florence-2 task token <FOO>: a detect model takes <OD>, "),
    ("caption", "<caption>", "a Florence-2 caption model takes a task token as its prompt"),
    ("caption", "a photo of", "plain text is for a detect model (phrase grounding)"),
    ("detect", "<REFERRING_EXPRESSION_SEGMENTATION>a dog", "a Florence-2 task that sightstream does not serve"),
    ("detect", "<OD> person", "<OD> takes no text after it"),
    ("detect", "<CAPTION_TO_PHRASE_GROUNDING>", "<CAPTION_TO_PHRASE_GROUNDING> needs what to find after it"),
    ("detect", "find <OD>", "one task token per prompt"),
    ("vqa", "what is it?", "Florence-2 serves task caption or detect, not 'vqa'"),
])
def test_prompts_refused_with_the_reason(task, prompt, message):
    with pytest.raises(ModelError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_prompt("hf_florence2", task, prompt)


async def test_a_prompt_of_the_wrong_kind_is_refused_at_start_or_dead_letters_with_the_reason(
        florence, redis_url, sync_redis, tmp_path, gradient):
    from sightstream import keys
    from sightstream.daemon.daemon import Daemon
    from sightstream.errors import ConfigError

    bad = run_family(redis_url, sync_redis, tmp_path, entry(florence, "detect"), [], prompt="<CAPTION>",
                     batch_size=1)
    with pytest.raises(ConfigError, match="pipelines.people..prompt: user/model cannot use it: <CAPTION> gives text"):
        Daemon(bad)  # in the config: refused at start, as PUT refuses it
    # the current version in Redis, set when the pipeline had another model: its frames say why
    settings = run_family(redis_url, sync_redis, tmp_path, entry(florence, "detect"), [encode(gradient)])
    sync_redis.hset(keys.prompt_current("people"), mapping={"text": "<CAPTION>", "version": 2})
    async with running(settings):
        await wait_for(lambda: sync_redis.xlen("deadletter:people:frames:{f}") == 1, 60)
    (_, dead), = entries(sync_redis, "deadletter:people:frames:{f}")
    assert dead["reason"] == b"model_error" and b"<CAPTION> gives text, and this is a detect model" in dead["error"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("task,prompt", [("caption", ""), ("detect", ""), ("detect", "a red car")])
def test_half_precision(task, prompt, dtype, florence, gradient, astronaut):
    adapter = HfFlorence2(str(florence), {"task": task, "dtype": dtype, "max_new_tokens": 12})
    adapter.load("cpu")
    assert adapter._model.dtype == getattr(torch, dtype) and adapter.memory_mb > 0
    out = predict(adapter, [gradient, astronaut], Prompt(prompt, 1))
    assert len(out) == 2
    if task == "detect":
        assert [(p.result["width"], p.result["height"]) for p in out] == [(96, 64), (512, 512)]
    else:
        assert all(isinstance(p.result["text"], str) for p in out)
    adapter.unload()
    assert adapter._model is None


def test_options_and_their_defaults(florence):
    assert HfFlorence2(str(florence), {"task": "detect"}).max_new_tokens == 256
    assert HfFlorence2(str(florence), {"task": "caption"}).max_new_tokens == 64
    beams = HfFlorence2(str(florence), {"task": "caption", "num_beams": 3, "max_new_tokens": 5})
    assert beams.num_beams == 3
    beams.load("cpu")
    assert beams.infer(beams.prepare([np.zeros((32, 48, 3), np.uint8)])).shape[1] <= 1 + 5


def test_a_checkpoint_not_in_the_native_format_is_refused(florence, tmp_path):
    """microsoft/Florence-2-* (trust_remote_code) name their weights otherwise: refused, not run
    with random weights."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "renamed"
    shutil.copytree(florence, folder)
    weights = load_file(folder / "model.safetensors")
    save_file({k.replace("vision_tower.", "vision_encoder."): v for k, v in weights.items()},
              folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="not in transformers' own Florence-2 format"):
        HfFlorence2(str(folder), {"task": "detect"}).load("cpu")


def test_lengths_past_the_models_positions_are_refused(florence, detector, gradient):
    """The tiny model has 512 positions (the real ones 1024): a longer prompt or output is refused."""
    with pytest.raises(ModelError, match="the prompt is too long: with the image it makes"):
        detector.prepare([gradient], Prompt("a red car " * 200, 1))
    with pytest.raises(ModelError, match="max_new_tokens 600: this model writes at most 511"):
        HfFlorence2(str(florence), {"task": "caption", "max_new_tokens": 600}).load("cpu")
