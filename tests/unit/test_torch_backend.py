"""The `torch` backend: TorchScript and torch.export files through the same adapters as ONNX
(YOLO detection, semantic segmentation), and image classification on either backend, each
loaded through a catalogue entry as a user's would be. (An Ultralytics TorchScript export's
boxes: tests/unit/test_models.py, beside the ONNX export's.)"""

from __future__ import annotations

import numpy as np
import pytest

from sightstream.config import ModelEntry
from sightstream.errors import ModelError
from sightstream.models.adapter import predict
from sightstream.models.catalogue import Catalogue
from sightstream.models.input_shape import InputShape
from sightstream.models.manager import ModelManager
from tests import tiny_torch
from tests.tiny_models import ROWS


def loaded(**entry):
    manager = ModelManager(Catalogue({"mine": {"v1": ModelEntry(backend="torch", **entry)}}))
    adapter = manager.create("mine/v1")
    adapter.load("cpu")
    return adapter


def test_a_batch_of_frames_gets_a_result_each(tmp_path):
    path = tiny_torch.constant_yolo(tmp_path / "yolo.pt", ROWS, classes=2)
    yolo = loaded(task="detect", path=str(path), input_size=64, labels=["a", "b"])
    preds = predict(yolo, [np.zeros((64, 64, 3), np.uint8)] * 3, None)
    assert [[d["label"] for d in p.result["detections"]] for p in preds] == [["b", "a"]] * 3


@pytest.mark.parametrize("exported", [False, True], ids=["torchscript", "torch.export"])
def test_segmentation_picks_an_output_of_a_dict_by_name(tmp_path, exported):
    path = tiny_torch.red_segmenter(tmp_path / ("seg.pt2" if exported else "seg.pt"), exported)
    frame = np.zeros((40, 60, 3), np.uint8)
    frame[:, :30] = (255, 0, 0)  # red left half: class 1
    frame[:, 30:] = (0, 255, 0)
    options = {"input_size": 32, "mean": [0, 0, 0], "std": [1, 1, 1], "labels": ["background", "red"]}
    for picked in ({}, {"output_name": "out"}):  # the first output is `out`
        (pred,) = predict(loaded(task="segment", path=str(path), **options, **picked), [frame], None)
        (mask,) = pred.result["masks"]
        assert mask["label"] == "red" and mask["area"] == pytest.approx(40 * 30, rel=0.05)
    with pytest.raises(ModelError, match=r"outputs \['out', 'aux'\]; fix input_name / output_name"):
        loaded(task="segment", path=str(path), **options, output_name="logits")  # told at load


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_a_segmenters_fixed_input_size_is_read_from_its_file(tmp_path, backend):
    # a fixed 32x32 input (ONNX, or a torch.export program) used to be run at the default 512:
    # "Got 512 Expected 32" / "Guard failed", unless the entry set input_size
    from tests.tiny_models import red_segmenter as onnx_segmenter

    path = (onnx_segmenter(tmp_path / "seg.onnx") if backend == "onnx"
            else tiny_torch.red_segmenter(tmp_path / "seg.pt2", exported=True))
    frame = np.zeros((40, 60, 3), np.uint8)
    frame[:, :30] = (255, 0, 0)
    frame[:, 30:] = (0, 255, 0)
    options = {"mean": [0, 0, 0], "std": [1, 1, 1], "labels": ["background", "red"]}
    manager = ModelManager(Catalogue({"mine": {"v1": ModelEntry(backend=backend, task="segment", path=str(path),
                                                                **options)}}))
    seg = manager.create("mine/v1")
    seg.load("cpu")
    assert seg.input_size == (32, 32)
    (pred,) = predict(seg, [frame], None)
    assert pred.result["masks"][0]["area"] == pytest.approx(40 * 30, rel=0.05)
    with pytest.raises(ModelError, match=r"fixed at 32x32, but its entry's input_size is 64x64: set "
                                         r"input_size = \[32, 32\]"):
        loaded(task="segment", path=str(tiny_torch.red_segmenter(tmp_path / "b.pt2", exported=True)),
               input_size=64, **options)


@pytest.mark.parametrize("probabilities", [False, True], ids=["logits", "probabilities"])
def test_a_classifier_gives_the_top_k_labels(tmp_path, probabilities):
    path = tiny_torch.colour_classifier(tmp_path / "colour.pt", probabilities, names=["red", "green", "blue"])
    classifier = loaded(task="classify", path=str(path), input_size=16, mean=[0, 0, 0], std=[1, 1, 1], top_k=2)
    green = np.zeros((30, 50, 3), np.uint8)
    green[..., 1] = 255
    (pred,) = predict(classifier, [green], None)
    assert (pred.result["width"], pred.result["height"]) == (50, 30)
    labels = pred.result["labels"]
    assert [x["label"] for x in labels][0] == "green" and len(labels) == 2
    expected = np.exp(10) / (np.exp(10) + 2)  # softmax of [0, 10, 0]: applied once, either way
    assert labels[0]["score"] == pytest.approx(expected, abs=1e-3)


def test_a_classifier_s_frames_are_squashed_or_centre_cropped(tmp_path):
    path = tiny_torch.colour_classifier(tmp_path / "colour.pt")
    squash = loaded(task="classify", path=str(path), input_size=[32, 16])
    assert squash.input_shape == InputShape.cover(32, 16)
    crop = loaded(task="classify", path=str(path), input_size=224, crop_pct=0.875)
    assert crop.input_shape == InputShape.edges(256)
    # a frame red on the left, blue on the right: the centre crop sees the middle only
    frame = np.zeros((100, 300, 3), np.uint8)
    frame[:, :100] = (255, 0, 0)
    frame[:, 100:200] = (0, 255, 0)
    frame[:, 200:] = (0, 0, 255)
    assert crop._resized(frame).shape == (224, 224, 3)
    assert crop._resized(frame)[:, :, 1].mean() > 200  # green: the middle third
    with pytest.raises(ModelError, match="crop_pct"):
        loaded(task="classify", path=str(path), crop_pct=1.5)


def test_onnx_classifiers_are_served_by_the_same_adapter(tmp_path):
    """An ONNX classifier needs only `backend = "onnx"` and `task = "classify"`."""
    import torch

    path = tmp_path / "colour.onnx"
    with tiny_torch.legacy():
        torch.onnx.export(tiny_torch.MeanColour(False), (torch.zeros(1, 3, 16, 16),), str(path),
                          input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "batch"}},
                          dynamo=False)
    manager = ModelManager(Catalogue({"mine": {"onnx": ModelEntry(
        backend="onnx", task="classify", path=str(path), input_size=16, mean=[0, 0, 0], std=[1, 1, 1],
        labels=["red", "green", "blue"])}}))
    classifier = manager.create("mine/onnx")
    classifier.load("cpu")
    blue = np.zeros((20, 20, 3), np.uint8)
    blue[..., 2] = 255
    preds = predict(classifier, [blue, blue], None)
    assert [p.result["labels"][0]["label"] for p in preds] == ["blue", "blue"]


def test_a_file_torch_cannot_read_is_a_clear_model_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="torch cannot load .*bad.pt as a TorchScript or torch.export file"):
        loaded(task="detect", path=str(bad))


def test_a_program_exported_with_a_fixed_batch_and_size_runs_image_by_image(tmp_path):
    """torch.export fixes shapes unless told otherwise: a batch of 1 at 64x64. Its input size
    is read from the program; a batch of three runs as three calls."""
    import torch

    table = torch.tensor(ROWS, dtype=torch.float32).T.unsqueeze(0)
    program = torch.export.export(tiny_torch.ConstantYolo(table), (torch.zeros(1, 3, 64, 64),))
    torch.export.save(program, str(tmp_path / "yolo.pt2"))
    yolo = loaded(task="detect", path=str(tmp_path / "yolo.pt2"), labels=["a", "b"])
    assert yolo.input_size == (64, 64) and yolo._model.fixed_batch == 1
    preds = predict(yolo, [np.zeros((64, 64, 3), np.uint8)] * 3, None)
    assert [[d["label"] for d in p.result["detections"]] for p in preds] == [["b", "a"]] * 3
    with pytest.raises(ModelError, match="runs in the dtype it was exported in"):
        loaded(task="detect", path=str(tmp_path / "yolo.pt2"), dtype="bfloat16")


def test_a_torchscript_model_in_bfloat16_and_its_size_as_the_manager_counts_it(tmp_path):
    path = tiny_torch.constant_yolo(tmp_path / "yolo.pt", ROWS, classes=2)
    manager = ModelManager(Catalogue({"mine": {"v1": ModelEntry(
        backend="torch", task="detect", path=str(path), input_size=64, dtype="bfloat16", labels=["a", "b"])}}))
    yolo = manager.create("mine/v1")
    yolo.load("cpu")
    assert yolo._model.module.table.dtype == torch_dtype("bfloat16")
    (pred,) = predict(yolo, [np.zeros((64, 64, 3), np.uint8)], None)
    assert [d["label"] for d in pred.result["detections"]] == ["b", "a"]
    assert yolo.memory_mb == pytest.approx(6 * 4 * 2 / 2**20)  # its one buffer, 24 values in bfloat16


def test_a_file_that_cannot_run_here_fails_at_load_with_the_reason(tmp_path):
    """A model that cannot take a 3-channel image of its input size fails once, at load."""
    import torch

    class OneChannel(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.conv2d(x, torch.ones(1, 1, 3, 3)).flatten(1)

    with tiny_torch.legacy():
        torch.jit.save(torch.jit.script(OneChannel()), str(tmp_path / "grey.pt"))
    with pytest.raises(ModelError, match="the model fails on a 16x16 input"):
        loaded(task="classify", path=str(tmp_path / "grey.pt"), input_size=16)


def torch_dtype(name):
    import torch

    return getattr(torch, name)
