"""Every model family through the real pipeline (real Redis): a tiny random-init model built
offline, loaded through a catalogue entry as a user's would be, and a result per contract."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from sightstream import keys
from sightstream.daemon.daemon import Daemon
from sightstream.errors import ConfigError
from tests import tiny_hf
from tests.conftest import encode
from tests.integration.helpers import entries, pending, running, serving, settings_for, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        "detr": tiny_hf.detr(root / "detr"),
        "rtdetr": tiny_hf.rtdetr(root / "rtdetr"),
        "depth": tiny_hf.depth_anything(root / "depth"),
        "owlv2": tiny_hf.owlv2(root / "owlv2"),
        "grounding_dino": tiny_hf.grounding_dino(root / "grounding_dino"),
        "caption": tiny_hf.blip(root / "caption", "caption"),
        "vqa": tiny_hf.blip(root / "vqa", "vqa"),
        "sam2": tiny_hf.sam2(root / "sam2"),
        "qwen": tiny_hf.qwen2_5_vl(root / "qwen"),
        "sam2_video": tiny_hf.sam2_video(root / "sam2_video"),
        "classify": tiny_hf.vit_classifier(root / "classify"),
        "convnext": tiny_hf.convnext_classifier(root / "convnext"),
    }


def run_family(redis_url, sync_redis, tmp_path, model_entry: dict, images: list[bytes], **pipeline):
    settings = settings_for(redis_url, tmp_path, [{"model": "user/model", "batch_size": len(images),
                                                    "batch_timeout_ms": 500, **pipeline}])
    settings.models["user"] = {"model": type(settings.models["tiny"]["det"])(**model_entry)}
    for image in images:
        sync_redis.xadd("frames:{f}", {"image": image})
    return settings


async def process(settings, sync_redis, n: int):
    async with running(settings):
        await wait_for(lambda: sync_redis.xlen("results:people:frames:{f}") == n, 60, f"{n} results")
    assert pending(sync_redis, "frames:{f}") == 0
    return entries(sync_redis, "results:people:frames:{f}")


@pytest.mark.parametrize("family", ["detr", "rtdetr"])
async def test_transformers_detectors(family, hf_models, redis_url, sync_redis, tmp_path, gradient, astronaut):
    images = [encode(gradient), encode(astronaut)]
    settings = run_family(redis_url, sync_redis, tmp_path,
                          {"backend": "transformers", "task": "detect", "path": str(hf_models[family]),
                           "score_threshold": 0.0}, images)
    results = await process(settings, sync_redis, 2)
    sizes = {(96, 64), (512, 512)}
    for _, f in results:
        assert f["task"] == b"detect" and f["model"] == b"user/model"
        r = json.loads(f["result"])
        assert (r["width"], r["height"]) in sizes
        assert r["detections"], "threshold 0 keeps every query"
        for det in r["detections"]:
            x1, y1, x2, y2 = det["box"]
            assert 0 <= x1 <= x2 <= r["width"] and 0 <= y1 <= y2 <= r["height"]
            assert det["label"] in ("cat", "dog") and det["class_id"] in (0, 1) and 0 <= det["score"] <= 1
        scores = [d["score"] for d in r["detections"]]
        assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("family", ["classify", "convnext"])  # ViT, ConvNeXt
async def test_image_classification_gives_the_top_k_labels(family, hf_models, redis_url, sync_redis, tmp_path,
                                                            gradient, astronaut):
    images = [encode(gradient), encode(astronaut)]
    settings = run_family(redis_url, sync_redis, tmp_path,
                          {"backend": "transformers", "task": "classify", "path": str(hf_models[family]),
                           "top_k": 2}, images)
    results = await process(settings, sync_redis, 2)
    sizes = {(96, 64), (512, 512)}
    for _, f in results:
        assert f["task"] == b"classify" and f["model"] == b"user/model"
        r = json.loads(f["result"])
        assert (r["width"], r["height"]) in sizes
        assert len(r["labels"]) == 2 and {x["label"] for x in r["labels"]} <= {"cat", "dog", "bird"}
        scores = [x["score"] for x in r["labels"]]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001


def test_a_classifier_keeps_only_labels_at_or_over_its_score_threshold(hf_models, astronaut):
    from sightstream.models.adapter import predict
    from sightstream.models.adapters.hf_classify import HfClassifier

    def labels(**options):
        model = HfClassifier(str(hf_models["convnext"]), {"top_k": 3, **options})
        model.load("cpu")
        (pred,) = predict(model, [astronaut])
        return pred.result["labels"]

    every = labels()
    assert len(every) == 3 and every[1]["score"] > every[2]["score"]
    kept = labels(score_threshold=(every[1]["score"] + every[2]["score"]) / 2)
    assert kept == every[:2]


@pytest.mark.parametrize("family,task,adapter,seen", [
    ("classify", "classify", "hf_classify:HfClassifier", (64, 64)),  # 1/8: still twice ViT's 32x32
    ("caption", "caption", "hf_vlm:HfImageToText", (128, 128)),  # 1/4: BLIP squashes to 96x96
])
async def test_a_loaded_transformers_model_gets_large_jpegs_dct_scaled(
        family, task, adapter, seen, hf_models, redis_url, sync_redis, tmp_path, gradient, astronaut,
        monkeypatch):
    """Once the model is loaded its processor's size is known, so a 512x512 JPEG is decoded at
    the least DCT scale that keeps every pixel the model uses; the result names the frame's size."""
    import importlib

    module, name = adapter.split(":")
    cls = getattr(importlib.import_module(f"sightstream.models.adapters.{module}"), name)
    from sightstream.models import self_test

    monkeypatch.setattr(self_test, "frame_for", lambda adapter: None)  # only the frames' shapes
    shapes: list[tuple[int, ...]] = []
    real = cls.prepare
    monkeypatch.setattr(cls, "prepare", lambda self, images, *rest: (
        shapes.extend(image.shape[:2] for image in images), real(self, images, *rest))[1])
    settings = run_family(redis_url, sync_redis, tmp_path,
                          {"backend": "transformers", "task": task, "path": str(hf_models[family])},
                          [encode(gradient)])  # loads the model
    async with running(settings) as daemon:
        stream = "results:people:frames:{f}"
        await wait_for(lambda: sync_redis.xlen(stream) == 1, 60, "the first result")
        assert daemon.decode_target("user/model") is not None
        sync_redis.xadd("frames:{f}", {"image": encode(astronaut)})
        await wait_for(lambda: sync_redis.xlen(stream) == 2, 60, "the second result")
    assert len(shapes) == 2 and shapes[1] == seen  # the first too, once its model loaded at start
    result = json.loads(entries(sync_redis, stream)[-1][1]["result"])
    if task == "classify":
        assert (result["width"], result["height"]) == (512, 512)  # the frame's, not the decoded size


async def test_torch_backend_detector_and_classifier(redis_url, sync_redis, tmp_path, gradient):
    """`backend = "torch"`: a TorchScript detector (an Ultralytics export's layout and
    config.txt) and a torch.export classifier, through the pipeline with nothing but a path."""
    import torch

    from tests import tiny_torch

    rows = [[32, 32, 20, 20, 0.1, 0.9]]
    detector = tiny_torch.constant_yolo(tmp_path / "det.torchscript", rows, classes=2, names={0: "cat", 1: "dog"})
    settings = run_family(redis_url, sync_redis, tmp_path, {"backend": "torch", "task": "detect",
                                                            "path": str(detector)}, [encode(gradient)] * 2)
    for _, f in await process(settings, sync_redis, 2):
        r = json.loads(f["result"])
        assert f["task"] == b"detect" and (r["width"], r["height"]) == (96, 64)
        assert [d["label"] for d in r["detections"]] == ["dog"]
    sync_redis.flushdb()
    program = torch.export.export(tiny_torch.MeanColour(False), (torch.zeros(2, 3, 16, 16),),
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=64)}})
    torch.export.save(program, str(tmp_path / "colour.pt2"))
    red = np.zeros((40, 60, 3), np.uint8)
    red[..., 0] = 255
    settings = run_family(redis_url, sync_redis, tmp_path,
                          {"backend": "torch", "task": "classify", "path": str(tmp_path / "colour.pt2"),
                           "input_size": 16, "mean": [0, 0, 0], "std": [1, 1, 1],
                           "labels": ["red", "green", "blue"]}, [encode(red, "PNG")] * 2)
    for _, f in await process(settings, sync_redis, 2):
        r = json.loads(f["result"])
        assert f["task"] == b"classify" and r["labels"][0]["label"] == "red" and (r["width"], r["height"]) == (60, 40)


async def test_depth_anything(hf_models, redis_url, sync_redis, tmp_path, gradient, astronaut):
    images = [encode(gradient), encode(astronaut)]
    settings = run_family(redis_url, sync_redis, tmp_path,
                          {"backend": "transformers", "task": "depth", "path": str(hf_models["depth"])}, images)
    results = await process(settings, sync_redis, 2)
    for _, f in results:
        assert f["task"] == b"depth"
        r = json.loads(f["result"])
        depth = Image.open(io.BytesIO(f["depth"]))
        assert depth.size == (r["width"], r["height"]) and depth.mode.startswith("I;16")
        values = np.asarray(depth)
        assert r["min"] <= r["max"] and values.min() == 0 and values.max() == 65535


async def test_onnx_semantic_segmentation(redis_url, sync_redis, tmp_path):
    from sightstream.models.masks import rle_decode
    from tests.tiny_models import red_segmenter

    frame = np.zeros((40, 60, 3), np.uint8)
    frame[:, :30] = (255, 0, 0)  # red left half: class 1
    frame[:, 30:] = (0, 255, 0)  # green right half: background
    settings = run_family(
        redis_url, sync_redis, tmp_path,
        {"backend": "onnx", "task": "segment", "path": str(red_segmenter(tmp_path / "seg.onnx")),
         "input_size": 32, "mean": [0, 0, 0], "std": [1, 1, 1], "input_name": "x",
         "output_name": "scores", "background_class_id": 0, "labels": ["background", "red"],
         "packbits": True},
        [encode(frame, "PNG")] * 2,
    )
    results = await process(settings, sync_redis, 2)
    for _, f in results:
        assert f["task"] == b"segment"
        r = json.loads(f["result"])
        assert (r["width"], r["height"]) == (60, 40)
        (m,) = r["masks"]
        assert m["label"] == "red" and m["class_id"] == 1
        decoded = rle_decode(m["rle"])
        expected = np.zeros((40, 60), bool)
        expected[:, :30] = True
        assert (decoded != expected).sum() <= 40  # nearest resize of a 32-px map: a column at most
        assert m["area"] == int(decoded.sum()) and "packbits" in m
        class_map = np.asarray(Image.open(io.BytesIO(f["mask"])))
        assert class_map.shape == (40, 60) and np.array_equal(class_map == 1, decoded)


@pytest.mark.parametrize("family", ["owlv2", "grounding_dino"])
async def test_open_vocabulary_detection_takes_its_labels_from_the_prompt(family, hf_models, redis_url, sync_redis, tmp_path, gradient, astronaut):
    images = [encode(gradient), encode(astronaut)]
    settings = run_family(redis_url, sync_redis, tmp_path,
                          {"backend": "transformers", "task": "detect", "adapter": "hf_open_vocab",
                           "path": str(hf_models[family]), "score_threshold": 0.0, "text_threshold": 0.0},
                          images, prompt="person. car.")
    results = await process(settings, sync_redis, 2)
    for _, f in results:
        assert f["prompt_version"] == b"1"  # a prompted model's results carry the prompt's version
        r = json.loads(f["result"])
        assert r["detections"]
        for det in r["detections"]:
            assert det["label"] in ("person", "car") and det["class_id"] == ["person", "car"].index(det["label"])
            x1, y1, x2, y2 = det["box"]
            assert 0 <= x1 <= x2 <= r["width"] and 0 <= y1 <= y2 <= r["height"]


def test_prompt_labels():
    from sightstream.models.adapters.hf_open_vocab import prompt_labels

    assert prompt_labels("person. red car, dog;\nbag.") == ["person", "red car", "dog", "bag"]
    assert prompt_labels("  ") == []


def test_phrases_map_to_prompt_labels():
    from sightstream.models.adapters.hf_open_vocab import match_label

    labels = ["person", "red car"]
    assert match_label("red car", labels) == ("red car", 1)
    assert match_label("a red car [SEP]", labels) == ("red car", 1)
    assert match_label("red", labels) == ("red car", 1)  # Grounding DINO's span of one label's words
    # its tokenizer lower-cases and splits punctuation off: the user's label is given back
    assert match_label("person", ["Person", "T-shirt"]) == ("Person", 0)
    assert match_label("t - shirt", ["Person", "T-shirt"]) == ("T-shirt", 1)
    # nothing the prompt asked for ("each detection's label is one of them"): the box is dropped
    assert match_label("bicycle", labels) is None
    assert match_label(".. [SEP]", labels) is None
    assert match_label("", labels) is None


LONG = "red car " * 30  # past every tiny text encoder here (OWLv2: 16 positions, BLIP: 32, GD: 32)


@pytest.mark.parametrize("model,adapter,options,prompt,why", [
    ("owlv2", "hf_open_vocab", {}, f"person. {LONG}", "the label 'red car red car"),
    ("grounding_dino", "hf_open_vocab", {}, f"person. {LONG}", "the prompt is"),
    ("caption", "hf_vlm", {"task": "caption", "max_new_tokens": 6}, LONG, "the caption's start is"),
    ("vqa", "hf_vlm", {"task": "vqa"}, f"what is {LONG}?", "the question is"),
])
def test_a_prompt_longer_than_the_text_encoder_takes_is_refused_saying_so(
        model, adapter, options, prompt, why, hf_models, gradient):
    """It was taken, then every frame failed with torch's words ('The size of tensor a (122)
    must match the size of tensor b (16)'), or, with a real OWL tokenizer, the label was cut."""
    from sightstream.errors import ModelError
    from sightstream.models.adapter import Prompt, predict
    from sightstream.models.adapters import adapter_class

    instance = adapter_class(adapter)(str(hf_models[model]), options)
    instance.load("cpu")
    problem = instance.prompt_problem(prompt)
    assert problem is not None and problem.startswith(why) and "reads at most" in problem
    with pytest.raises(ModelError, match=re.escape(problem)):
        predict(instance, [gradient], Prompt(prompt, 1))
    fine = "person. car." if adapter == "hf_open_vocab" else "what is it?"
    assert instance.prompt_problem(fine) is None
    assert len(predict(instance, [gradient], Prompt(fine, 1))) == 1


def test_a_configured_prompt_is_checked_at_start(hf_models, redis_url, sync_redis, tmp_path):
    from structlog.testing import capture_logs

    owl = {"backend": "transformers", "task": "detect", "adapter": "hf_open_vocab", "path": str(hf_models["owlv2"])}
    with capture_logs() as logs:
        Daemon(run_family(redis_url, sync_redis, tmp_path, owl, [], batch_size=1))  # may be set over HTTP
    (said,) = [e for e in logs if e["event"] == "pipeline_prompt_empty"]
    assert said["pipeline"] == "people" and "needs labels" in said["why"] and "PUT /pipelines/people" in said["hint"]
    plain = settings_for(redis_url, tmp_path, [{"prompt": "a dog"}])  # tiny/det takes no prompt
    with pytest.raises(ConfigError, match=re.escape("pipelines[people].prompt: tiny/det cannot use it: this model "
                                                    "takes no prompt")):
        Daemon(plain)


async def test_a_prompt_the_loaded_model_cannot_read_is_a_422(hf_models, redis_url, sync_redis, tmp_path, gradient):
    settings = run_family(redis_url, sync_redis, tmp_path,
                          {"backend": "transformers", "task": "detect", "adapter": "hf_open_vocab",
                           "path": str(hf_models["owlv2"])}, [encode(gradient)], prompt="person")
    async with serving(settings) as (d, client):
        await wait_for(lambda: sync_redis.xlen("results:people:frames:{f}") == 1, 60, "the model loaded")
        r = await client.put("/pipelines/people/prompt", json={"text": f"person. {LONG}"})
        assert r.status == 422
        assert "user/model cannot use this prompt: the label 'red car" in (await r.json())["error"]["message"]
        r = await client.post("/jobs", json={"source": "redis://frames:{f}", "model": "user/model",
                                             "prompt": LONG, "max_frames": 1})
        assert r.status == 422 and "reads at most 16 per label" in (await r.json())["error"]["message"]
        assert (await client.get("/pipelines/people/prompt")).headers["ETag"] == '"1"'  # unchanged


@pytest.mark.parametrize("task,prompt", [("caption", ""), ("caption", "a photo of"), ("vqa", "what is in the image?")])
async def test_image_to_text(task, prompt, hf_models, redis_url, sync_redis, tmp_path, gradient, astronaut):
    images = [encode(gradient), encode(astronaut), encode(gradient)]
    settings = run_family(redis_url, sync_redis, tmp_path,
                          {"backend": "transformers", "task": task, "path": str(hf_models[task]),
                           "max_new_tokens": 6}, images, prompt=prompt)
    results = await process(settings, sync_redis, 3)
    for _, f in results:
        assert f["task"] == task.encode() and f["prompt_version"] == b"1"
        r = json.loads(f["result"])
        assert set(r) == {"text"} and isinstance(r["text"], str)
        words = r["text"].split()
        assert len(words) <= 6 + len(prompt.split())  # max_new_tokens bounds the generation
        if task == "caption" and prompt:
            assert r["text"].startswith(prompt)  # a caption prompt starts the caption


async def test_a_vqa_pipeline_without_a_question_dead_letters_with_a_reason(hf_models, redis_url, sync_redis, tmp_path, gradient):
    settings = run_family(redis_url, sync_redis, tmp_path,
                          {"backend": "transformers", "task": "vqa", "path": str(hf_models["vqa"])},
                          [encode(gradient)])
    async with running(settings):
        await wait_for(lambda: sync_redis.xlen("deadletter:people:frames:{f}") == 1, 60)
    (_, dead), = entries(sync_redis, "deadletter:people:frames:{f}")
    assert dead["reason"] == b"model_error" and b"needs a question" in dead["error"]
    assert dead["error"].startswith(b"the model failed: a vqa model needs a question")  # a sentence, not a repr


@pytest.mark.parametrize("prompt,objects", [
    ('{"boxes": [[10, 10, 60, 40], [100, 100, 300, 300]]}', 2),
    ('{"points": [[50, 50], [200, 220]], "point_labels": [1, 1]}', 2),
])
async def test_sam2_segments_the_prompted_objects(prompt, objects, hf_models, redis_url, sync_redis, tmp_path, astronaut, gradient):
    from sightstream.models.masks import rle_decode

    images = [encode(astronaut), encode(gradient)]
    settings = run_family(redis_url, sync_redis, tmp_path,
                          {"backend": "transformers", "task": "segment", "path": str(hf_models["sam2"])},
                          images, prompt=prompt)
    results = await process(settings, sync_redis, 2)
    for _, f in results:
        assert f["task"] == b"segment" and f["prompt_version"] == b"1"
        r = json.loads(f["result"])
        assert len(r["masks"]) == objects
        index = np.asarray(Image.open(io.BytesIO(f["mask"])))
        assert index.shape == (r["height"], r["width"])
        for m in r["masks"]:
            decoded = rle_decode(m["rle"])
            assert decoded.shape == index.shape and m["area"] == int(decoded.sum())


async def test_a_bad_sam2_prompt_is_refused_at_start_or_dead_letters_with_a_reason(
        hf_models, redis_url, sync_redis, tmp_path, gradient):
    entry = {"backend": "transformers", "task": "segment", "path": str(hf_models["sam2"])}
    # in the config: refused at start, as PUT refuses it (it was taken, then every frame failed)
    for prompt, why in (("the dog please", "a SAM2 prompt is JSON"),
                        ('{"labels": ["dog"]}', "SAM2 segments what its prompt points at")):
        bad = run_family(redis_url, sync_redis, tmp_path, entry, [], prompt=prompt, batch_size=1)
        with pytest.raises(ConfigError, match=re.escape(f"pipelines[people].prompt: user/model cannot use it: {why}")):
            Daemon(bad)
    # the current version in Redis, set when the pipeline had another model: its frames say why
    settings = run_family(redis_url, sync_redis, tmp_path, entry, [encode(gradient)])
    sync_redis.hset(keys.prompt_current("people"), mapping={"text": "the dog please", "version": 2})
    async with running(settings):
        await wait_for(lambda: sync_redis.xlen("deadletter:people:frames:{f}") == 1, 60)
    (_, dead), = entries(sync_redis, "deadletter:people:frames:{f}")
    assert b"a SAM2 prompt is JSON" in dead["error"]


async def test_the_sam2_package_segments_the_prompted_objects(redis_url, sync_redis, tmp_path, astronaut, gradient):
    from sightstream.models.masks import rle_decode

    checkpoint = tiny_hf.sam2_package(tmp_path / "sam2.1_tiny.pt")
    settings = run_family(redis_url, sync_redis, tmp_path,
                          {"backend": "sam2", "task": "segment", "path": str(checkpoint),
                           "hydra_overrides": tiny_hf.SAM2_PACKAGE_OVERRIDES},
                          [encode(astronaut), encode(gradient)],
                          prompt='{"boxes": [[10, 10, 60, 40], [20, 5, 90, 50], [0, 0, 30, 30]]}')
    results = await process(settings, sync_redis, 2)
    for _, f in results:
        assert f["task"] == b"segment" and f["model"] == b"user/model"
        r = json.loads(f["result"])
        assert [m["object"] for m in r["masks"]] == [0, 1, 2]
        index = np.asarray(Image.open(io.BytesIO(f["mask"])))
        assert index.shape == (r["height"], r["width"])
        for m in r["masks"]:
            assert m["area"] == int(rle_decode(m["rle"]).sum())


@pytest.mark.parametrize("task,prompt", [("caption", ""), ("vqa", "what is in the image?")])
async def test_qwen2_5_vl(task, prompt, hf_models, redis_url, sync_redis, tmp_path, gradient, astronaut):
    images = [encode(gradient), encode(astronaut), encode(astronaut[:200, :100])]  # three shapes, one batch
    settings = run_family(redis_url, sync_redis, tmp_path,
                          {"backend": "transformers", "task": task, "adapter": "hf_qwen_vl",
                           "path": str(hf_models["qwen"]), "max_new_tokens": 5}, images, prompt=prompt)
    results = await process(settings, sync_redis, 3)
    for _, f in results:
        assert f["task"] == task.encode() and f["prompt_version"] == b"1"
        r = json.loads(f["result"])
        assert set(r) == {"text"} and isinstance(r["text"], str)
        assert "<|" not in r["text"] and "what is in the image" not in r["text"]  # only new tokens


async def test_ocr_reads_text_with_real_weights(redis_url, sync_redis, tmp_path):
    from PIL import ImageDraw, ImageFont

    img = Image.new("RGB", (640, 200), "white")
    draw = ImageDraw.Draw(img)
    draw.text((20, 20), "HELLO 2026", fill="black", font=ImageFont.load_default(size=48))
    draw.text((20, 110), "EXIT", fill="black", font=ImageFont.load_default(size=48))
    settings = settings_for(redis_url, tmp_path, [{"model": "ocr/ppocr-v6", "batch_size": 2}])
    sync_redis.xadd("frames:{f}", {"image": encode(np.asarray(img), "PNG")})
    results = await process(settings, sync_redis, 1)
    (_, f), = results
    r = json.loads(f["result"])
    assert [d["text"] for d in r["detections"]] == ["HELLO 2026", "EXIT"]  # top to bottom
    assert r["text"] == "HELLO 2026\nEXIT"
    first = r["detections"][0]
    assert first["score"] > 0.9 and first["label"] == "text" and len(first["polygon"]) == 4
    x1, y1, x2, y2 = first["box"]
    assert 10 <= x1 < x2 <= 640 and 10 <= y1 < y2 <= 100


HALF = [  # adapter, model, prompt, options
    ("hf_detection", "detr", None, {}),
    ("hf_detection", "rtdetr", None, {}),
    ("hf_open_vocab", "owlv2", "cat. dog.", {}),
    ("hf_open_vocab", "grounding_dino", "cat. dog.", {}),
    ("hf_depth", "depth", None, {}),
    ("hf_classify", "classify", None, {}),
    ("hf_vlm", "caption", "", {"task": "caption"}),
    ("hf_vlm", "vqa", "what is it?", {"task": "vqa"}),
    ("hf_qwen_vl", "qwen", "what is it?", {"task": "vqa"}),
    ("hf_sam2", "sam2", '{"boxes": [[1, 1, 50, 50]]}', {}),
    ("hf_sam2_video", "sam2_video", '{"boxes": [[1, 1, 50, 50]]}', {}),
]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("adapter,model,prompt,options", HALF, ids=[h[1] for h in HALF])
def test_every_torch_family_runs_in_half_precision(adapter, model, prompt, options, dtype, hf_models, gradient):
    """GPUs run torch models in float16 (or bfloat16): each family's inputs must follow the
    model's dtype. Checked on the CPU, which runs both (no GPU in CI)."""
    from sightstream.models.adapter import FrameContext, Prompt, predict
    from sightstream.models.adapters import adapter_class

    instance = adapter_class(adapter)(str(hf_models[model]), {**options, "dtype": dtype})
    instance.load("cpu")
    assert instance._model.dtype == getattr(__import__("torch"), dtype)
    args: list = [[gradient, gradient], Prompt(prompt, 1) if prompt is not None else None]
    if instance.uses_context:
        args.append([FrameContext("a", 1), FrameContext("b", 1)])
    out = predict(instance, *args)
    assert len(out) == 2 and all(isinstance(p.result, dict) for p in out)
    if instance.task in ("detect", "segment", "depth", "track", "classify"):
        assert all((p.result["width"], p.result["height"]) == (96, 64) for p in out)
    else:
        assert all(isinstance(p.result["text"], str) for p in out)


def test_an_unknown_dtype_is_refused_with_the_choices(hf_models):
    from sightstream.errors import ModelError
    from sightstream.models.adapters.hf_detection import HfDetector

    with pytest.raises(ModelError, match="use float16, bfloat16 or float32"):
        HfDetector(str(hf_models["detr"]), {"dtype": "int8"}).load("cpu")


@pytest.mark.parametrize("adapter,model,prompt", [
    ("hf_detection", "detr", None), ("hf_open_vocab", "grounding_dino", "cat. dog."),
    ("hf_classify", "classify", None), ("hf_depth", "depth", None)])
def test_images_one_or_three_pixels_high_are_read_as_images(adapter, model, prompt, hf_models):
    """Left to guess, transformers' processors take an array 1 or 3 pixels high for channels
    first: they failed on the one ('mean must have 1 elements') and misread the other."""
    from sightstream.models.adapter import Prompt, predict
    from sightstream.models.adapters import adapter_class

    instance = adapter_class(adapter)(str(hf_models[model]), {})
    instance.load("cpu")
    width = 12 if model == "depth" else 24  # depth keeps the aspect ratio in multiples of 14 pixels
    for height in (1, 3):
        image = np.full((height, width, 3), 128, np.uint8)
        (out,) = predict(instance, [image], Prompt(prompt, 1) if prompt else None)
        assert (out.result["width"], out.result["height"]) == (width, height)
    pixels = instance.prepare([np.full((3, width, 3), 128, np.uint8)], Prompt(prompt, 1) if prompt else None)
    if model != "classify":  # the others keep the aspect ratio: wide stays wide
        height, width = pixels.tensors["pixel_values"].shape[-2:]
        assert width > height
