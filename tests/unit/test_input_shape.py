"""How models size frames (InputShape), read from transformers image processors, and the
DCT scale the decoder picks from it: never below what the model keeps of a frame."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sightstream.models.adapter import input_shape
from sightstream.models.adapters.hf_common import shape_of
from sightstream.models.input_shape import InputShape
from sightstream.stages.decoder import draft_size


@pytest.mark.parametrize("shape,frame,scale", [
    (InputShape.fit(640, 640), (1920, 1080), 1 / 3),  # the longest edge to 640
    (InputShape.cover(224, 224), (1920, 1080), 224 / 1080),  # both sides at least 224
    (InputShape.edges(800, 1333), (1920, 1080), 1333 / 1920),  # DETR: the longest edge caps it
    (InputShape.edges(800, 1333), (1000, 1000), 0.8),
    (InputShape.edges(224), (1920, 1080), 224 / 1080),
])
def test_each_rule_scales_a_frame_as_its_processor_does(shape, frame, scale):
    assert shape.scale(*frame) == pytest.approx(scale)


@pytest.mark.parametrize("shape,least", [
    (InputShape.fit(640, 640), (640, 360)),
    (InputShape.cover(224, 224), (399, 224)),  # a squash to 224x224 keeps 224 rows of the frame
    (InputShape.cover(384, 384), (683, 384)),
    (InputShape.edges(800, 1333), None),  # keeps more than half: full size
    (InputShape.cover(1024, 64), None),
    (None, None),
])
def test_the_least_decoded_size_keeps_every_pixel_the_model_uses(shape, least):
    assert draft_size(1920, 1080, shape) == least


def processor(size, **attributes):
    return SimpleNamespace(do_resize=True, size=size, **attributes)


@pytest.mark.parametrize("image_processor,shape", [
    (processor({"height": 224, "width": 224}), InputShape.cover(224, 224)),  # ViT, BLIP, RT-DETR
    (processor({"shortest_edge": 800, "longest_edge": 1333}), InputShape.edges(800, 1333)),  # DETR
    (processor({"shortest_edge": 224}, crop_size={"height": 224, "width": 224}), InputShape.edges(224)),  # CLIP
    (processor({"shortest_edge": 224}, crop_pct=0.875), InputShape.edges(256)),  # ConvNeXt below 384
    (processor({"longest_edge": 512}), InputShape.fit(512, 512)),
    (processor(SimpleNamespace(height=384, width=384, shortest_edge=None)), InputShape.cover(384, 384)),
    (processor({"max_height": 512, "max_width": 512}), None),  # a rule not known here: full size
    (SimpleNamespace(do_resize=False, size={"height": 224, "width": 224}), None),
    (processor({"shortest_edge": 336}, image_grid_pinpoints=[[336, 672]]), None),  # LLaVA-NeXT tiles
    (processor({"longest_edge": 980}, do_image_splitting=True), None),  # Idefics2/3 tiles
])
def test_a_transformers_image_processor_s_size_gives_its_shape(image_processor, shape):
    assert shape_of(image_processor) == shape


def test_a_detector_without_a_shape_letterboxes_to_its_input_size():
    assert input_shape(SimpleNamespace(task="detect", input_size=(320, 320))) == InputShape.fit(320, 320)
    assert input_shape(SimpleNamespace(task="detect", input_size=None)) is None
    # a classifier's input size may be reached by a crop: only its own input_shape tells
    assert input_shape(SimpleNamespace(task="classify", input_size=(224, 224))) is None
    assert input_shape(SimpleNamespace(task="classify", input_size=None,
                                       input_shape=InputShape.cover(8, 8))) == InputShape.cover(8, 8)


def test_the_transformers_adapters_know_their_shape_once_loaded(tmp_path):
    from sightstream.models.adapters.hf_classify import HfClassifier
    from sightstream.models.adapters.hf_qwen_vl import HfQwenVL
    from tests import tiny_hf

    vit = HfClassifier(str(tiny_hf.vit_classifier(tmp_path / "vit")), {})
    assert vit.input_shape is None  # not loaded: nothing read yet
    vit.load("cpu")
    assert vit.input_shape == InputShape.cover(32, 32)
    # Qwen's size holds pixel counts (min and max pixels), not edges: frames stay whole
    qwen = HfQwenVL(str(tiny_hf.qwen2_5_vl(tmp_path / "qwen")), {})
    qwen.load("cpu")
    assert qwen.input_shape is None


def test_smolvlm_and_florence2_squash_frames_to_a_square(tmp_path):
    from sightstream.models.adapters.hf_florence2 import HfFlorence2
    from sightstream.models.adapters.hf_smolvlm import HfSmolVLM
    from tests.tiny_florence2 import florence2
    from tests.tiny_smolvlm import smolvlm

    folder = smolvlm(tmp_path / "smolvlm")
    one_tile = HfSmolVLM(str(folder), {})
    one_tile.load("cpu")
    assert one_tile.input_shape == InputShape.cover(64, 64)  # its max_image_size
    tiled = HfSmolVLM(str(folder), {"do_image_splitting": True})
    tiled.load("cpu")
    assert tiled.input_shape is None  # tiles are cut from a frame resized up to whole tiles
    florence = HfFlorence2(str(florence2(tmp_path / "florence2")), {})
    florence.load("cpu")
    assert florence.input_shape == InputShape.cover(64, 64)


def test_the_manager_does_not_resolve_a_transformers_model_before_it_loads(monkeypatch):
    """Asked on the event loop for every decoded chunk: a transformers model's shape comes from
    its processor once loaded, so its entry is not resolved (a hub lookup) before that."""
    from sightstream.config import ModelEntry
    from sightstream.models.catalogue import Catalogue
    from sightstream.models.manager import ModelManager

    entry = ModelEntry(backend="transformers", task="classify", path="google/vit-base-patch16-224")
    manager = ModelManager(Catalogue({"vit": {"base": entry}}))
    monkeypatch.setattr(manager, "create", lambda model_id: pytest.fail("resolved before load"))
    assert manager.decode_shape("vit/base") is None
