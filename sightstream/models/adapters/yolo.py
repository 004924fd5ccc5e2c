"""A generic YOLO-style ONNX detector: a user's own export works with only a `path`.

Layouts: `yolov8` (Ultralytics v8/v11 exports: output [batch, 4 + classes, anchors], boxes as
cx, cy, w, h; no objectness) — also accepted transposed, [batch, anchors, 4 + classes] — and
`yolov5` ([batch, anchors, 5 + classes] with an objectness score). Class names and input size
come from the export's metadata (`names`, `imgsz`) when present, else from the options
(`labels`, `input_size`), else COCO's 80 names where the model has 80 classes.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any

import numpy as np

from sightstream.errors import BatchSizeMismatch, ModelError
from sightstream.frames import Prediction, empty_box
from sightstream.models.adapter import FrameContext, Prompt, bounded, label_list
from sightstream.models.adapters.onnx_common import batched_nms, letterbox
from sightstream.models.adapters.runner import OnFile, Runner, class_names, warm_up

COCO80 = (
    "person|bicycle|car|motorcycle|airplane|bus|train|truck|boat|traffic light|fire hydrant|"
    "stop sign|parking meter|bench|bird|cat|dog|horse|sheep|cow|elephant|bear|zebra|giraffe|"
    "backpack|umbrella|handbag|tie|suitcase|frisbee|skis|snowboard|sports ball|kite|"
    "baseball bat|baseball glove|skateboard|surfboard|tennis racket|bottle|wine glass|cup|fork|"
    "knife|spoon|bowl|banana|apple|sandwich|orange|broccoli|carrot|hot dog|pizza|donut|cake|"
    "chair|couch|potted plant|bed|dining table|toilet|tv|laptop|mouse|remote|keyboard|"
    "cell phone|microwave|oven|toaster|sink|refrigerator|book|clock|vase|scissors|teddy bear|"
    "hair drier|toothbrush"
).split("|")


@dataclass(slots=True)
class Prepared:
    pixels: np.ndarray  # NCHW float32 in 0-1
    transforms: list[tuple[float, tuple[float, float], int, int]]  # scale, offset, width, height


class YoloDetector(OnFile):
    task = "detect"
    takes_prompt = False
    uses_context = False

    def __init__(self, path: str | bytes, options: dict[str, Any]) -> None:
        self._path = path
        self._options = options
        self.layout = str(options.get("layout", "yolov8"))
        if self.layout not in ("yolov8", "yolov5"):
            raise ModelError(f"layout must be yolov8 or yolov5, not {self.layout!r}")
        size = options.get("input_size")
        if size is not None:
            bounded("input_size", int(size), 32)
        self.input_size: tuple[int, int] | None = (int(size), int(size)) if size else None
        self.score_threshold = bounded("score_threshold", float(options.get("score_threshold", 0.25)), 0, 1)
        self.iou_threshold = bounded("iou_threshold", float(options.get("iou_threshold", 0.45)), 0, 1)
        self.max_detections = bounded("max_detections", int(options.get("max_detections", 300)), 1)
        self.labels: list[str] = label_list(options)
        self._model: Runner | None = None

    def load(self, device: str) -> None:
        self._model = self._open(device)
        meta = self._model.metadata
        try:
            if self.input_size is None:
                self.input_size = _input_size(self._model.input_dims, meta)
            if not self.labels and "names" in meta:
                self.labels = class_names(meta["names"])
        except (ValueError, SyntaxError, TypeError) as e:
            raise ModelError(f"the export's metadata (imgsz, names) cannot be read: {e}; set input_size "
                             "and labels in the model's entry") from None
        if self.on_torch:
            warm_up(self._model, *self.input_size)  # its size is known only now

    def unload(self) -> None:
        self._model = None

    def prepare(
        self, images: list[np.ndarray], prompt: Prompt | None = None,
        contexts: list[FrameContext] | None = None,
    ) -> Prepared:
        assert self.input_size is not None, "load() first"
        w, h = self.input_size
        # Written straight into one NCHW float buffer: no stack/transpose/astype copies.
        assert self._model is not None, "load() first"
        batch = self._model.host_buffer((len(images), 3, h, w))
        transforms = []
        for i, img in enumerate(images):
            canvas, scale, offset = letterbox(img, self.input_size)
            for c in range(3):
                np.multiply(canvas[..., c], 1 / 255, out=batch[i, c], dtype=np.float32)
            transforms.append((scale, offset, img.shape[1], img.shape[0]))
        return Prepared(batch, transforms)

    def infer(self, prepared: Prepared) -> list[np.ndarray]:
        assert self._model is not None, "load() first"
        return self._model.run(prepared.pixels)

    def finish(self, prepared: Prepared, outputs: list[np.ndarray]) -> list[Prediction]:
        out, n = outputs[0], len(prepared.transforms)
        if len(out) != n:
            raise BatchSizeMismatch(f"the model returned {len(out)} results for {n} images")
        return [self._decode(out[i], *prepared.transforms[i]) for i in range(n)]

    def _decode(self, raw: np.ndarray, scale, offset, width, height) -> Prediction:
        rows = self._rows(raw)
        self._default_labels(rows.shape[1] - (5 if self.layout == "yolov5" else 4))
        if self.layout == "yolov5":
            class_scores = rows[:, 5:] * rows[:, 4:5]
        else:
            class_scores = rows[:, 4:]
        class_ids = class_scores.argmax(axis=1)
        scores = class_scores[np.arange(len(rows)), class_ids]
        keep = scores >= self.score_threshold
        rows, scores, class_ids = rows[keep], scores[keep], class_ids[keep]
        cx, cy, w, h = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        order = batched_nms(boxes, scores, class_ids, self.iou_threshold)[: self.max_detections]
        ox, oy = offset
        limits = np.array([width, height, width, height], dtype=np.float32)
        detections = []
        for i in order:
            box = (boxes[i] - [ox, oy, ox, oy]) / scale
            box = np.clip(box, 0, limits)
            if empty_box(box):
                continue
            cid = int(class_ids[i])
            detections.append(
                {"box": [round(float(v), 1) for v in box], "score": round(float(scores[i]), 4),
                 "label": self._label(cid), "class_id": cid}
            )
        return Prediction({"width": width, "height": height, "detections": detections})

    def _rows(self, raw: np.ndarray) -> np.ndarray:
        """One row per anchor: [cx, cy, w, h, (objectness,) class scores...]."""
        if raw.ndim != 2:
            raise ModelError(f"expected a [batch, rows, cols] output, got shape {raw.shape}")
        if self.layout == "yolov8":
            # [4 + classes, anchors] is the export's layout; real models have far more anchors
            # than channels, and known class names settle it for any shape.
            if self.labels and 4 + len(self.labels) not in raw.shape:
                raise ModelError(f"its entry's labels name {len(self.labels)} classes, but the output is "
                                 f"{list(raw.shape)}: neither side is 4 + {len(self.labels)}")
            channels_first = (
                raw.shape[0] == 4 + len(self.labels) if self.labels else raw.shape[0] < raw.shape[1]
            )
            if channels_first:
                raw = raw.T
        if raw.shape[1] <= (5 if self.layout == "yolov5" else 4):
            raise ModelError(f"the output {list(raw.shape)} has no class scores as read (layout "
                             f"{self.layout}); with fewer anchors than channels, set labels (one name "
                             "per class) so the layout can be told")
        return raw

    def _label(self, class_id: int) -> str:
        if class_id < len(self.labels):
            return self.labels[class_id]
        return str(class_id)

    def _default_labels(self, classes: int) -> None:
        if not self.labels and classes == len(COCO80):
            self.labels = list(COCO80)


def _input_size(shape: list | None, meta: dict[str, Any]) -> tuple[int, int]:
    """From the input's fixed dims, else the export's `imgsz` (ONNX: a literal; Ultralytics'
    config.txt: a list or a number), else YOLOv5's TorchScript `shape` ([batch, 3, h, w]),
    else 640."""
    if shape is not None and len(shape) == 4 and isinstance(shape[2], int) and isinstance(shape[3], int):
        return (shape[3], shape[2])
    v5_shape = meta.get("shape")
    if "imgsz" not in meta and isinstance(v5_shape, list) and len(v5_shape) == 4:
        return (int(v5_shape[3]), int(v5_shape[2]))
    size = meta.get("imgsz")
    if isinstance(size, str):
        size = ast.literal_eval(size)
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return (int(size[1]), int(size[0]))
    return (640, 640)


class TorchYoloDetector(YoloDetector):
    """The same detector on a TorchScript or torch.export file (backend `torch`), such as
    Ultralytics' `format="torchscript"` export: input size and names from its config.txt."""

    on_torch = True
