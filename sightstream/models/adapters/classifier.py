"""Image classification on an ONNX or TorchScript / torch.export file (a ResNet, EfficientNet,
an Ultralytics `-cls` export, a user's own): one output of class scores per image.

Options:
- `input_size` (224, or [width, height]); `crop_pct`: unset, the frame is resized to the input
  (aspect ignored); set (e.g. 0.875, timm's and torchvision's recipe), its shortest edge is
  resized to input / crop_pct and the centre cropped to the input.
- `mean` and `std` on 0-1 pixels (ImageNet's by default; `[0,0,0]` and `[1,1,1]` for models
  that take 0-1 pixels, as Ultralytics' do).
- `labels` (else the export's `names` metadata, else class ids), `top_k` (5),
  `score_threshold` (0).
Scores are softmax probabilities: a model that outputs logits gets a softmax, one whose rows are
already probabilities (each in 0-1, summing to 1) is left as it is.
Result: `{"width", "height", "labels": [{"label", "class_id", "score"}, …]}`, best first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from sightstream.errors import BatchSizeMismatch, ModelError
from sightstream.frames import Prediction
from sightstream.models.adapter import FrameContext, Prompt, label_list
from sightstream.models.adapters.runner import OnFile, Runner, class_names
from sightstream.models.input_shape import InputShape


@dataclass(slots=True)
class Prepared:
    pixels: np.ndarray  # NCHW float32, normalised
    sizes: list[tuple[int, int]]  # each frame's (width, height)


class OnnxClassifier(OnFile):
    task = "classify"
    takes_prompt = False
    uses_context = False
    input_size = None  # not a letterbox: input_shape says how frames are sized

    def __init__(self, path: str | bytes, options: dict[str, Any]) -> None:
        self._path = path
        self._options = options
        size = options.get("input_size", 224)
        w, h = (size, size) if isinstance(size, int) else size
        self.size = (int(w), int(h))
        crop = options.get("crop_pct")
        self.crop_pct = float(crop) if crop else None
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise ModelError(f"crop_pct must be in (0, 1], not {crop}")
        self.mean = np.asarray(options.get("mean", [0.485, 0.456, 0.406]), dtype=np.float32)
        self.std = np.asarray(options.get("std", [0.229, 0.224, 0.225]), dtype=np.float32)
        self.labels: list[str] = label_list(options)
        self.top_k = int(options.get("top_k", 5))
        self.score_threshold = float(options.get("score_threshold", 0.0))
        self._model: Runner | None = None

    @property
    def input_shape(self) -> InputShape:
        w, h = self.size
        if self.crop_pct is None:
            return InputShape.cover(w, h)
        return InputShape.edges(round(min(w, h) / self.crop_pct))

    def load(self, device: str) -> None:
        self._model, self.size = self._open_fixed(device, self.size)
        if not self.labels and "names" in self._model.metadata:
            try:
                self.labels = class_names(self._model.metadata["names"])
            except (ValueError, SyntaxError, TypeError) as e:
                raise ModelError(f"the export's names cannot be read: {e}; set labels in the model's "
                                 "entry") from None

    def unload(self) -> None:
        self._model = None

    def prepare(self, images: list[np.ndarray], prompt: Prompt | None = None,
                contexts: list[FrameContext] | None = None) -> Prepared:
        assert self._model is not None, "load() first"
        w, h = self.size
        batch = self._model.host_buffer((len(images), 3, h, w))
        for i, image in enumerate(images):
            pixels = self._resized(image).astype(np.float32) / 255.0
            batch[i] = ((pixels - self.mean) / self.std).transpose(2, 0, 1)
        return Prepared(batch, [(img.shape[1], img.shape[0]) for img in images])

    def _resized(self, image: np.ndarray) -> np.ndarray:
        w, h = self.size
        picture = Image.fromarray(image)
        if self.crop_pct is None:
            return np.asarray(picture.resize((w, h), Image.Resampling.BILINEAR))
        scale = min(w, h) / self.crop_pct / min(picture.size)
        rw, rh = max(w, round(picture.width * scale)), max(h, round(picture.height * scale))
        picture = picture.resize((rw, rh), Image.Resampling.BILINEAR)
        left, top = (rw - w) // 2, (rh - h) // 2
        return np.asarray(picture.crop((left, top, left + w, top + h)))

    def infer(self, prepared: Prepared) -> np.ndarray:
        assert self._model is not None, "load() first"
        return self._model.run(prepared.pixels)[0]

    def finish(self, prepared: Prepared, scores: np.ndarray) -> list[Prediction]:
        if scores.ndim != 2:
            raise ModelError(f"expected class scores [batch, classes], got shape {scores.shape}")
        if len(scores) != len(prepared.sizes):
            raise BatchSizeMismatch(f"the model returned {len(scores)} rows for {len(prepared.sizes)} images")
        probabilities = scores if _are_probabilities(scores) else _softmax(scores)
        k = min(self.top_k, probabilities.shape[1])
        out = []
        for (width, height), row in zip(prepared.sizes, probabilities):
            best = np.argsort(-row, kind="stable")[:k]
            labels = [{"label": self._label(int(c)), "class_id": int(c), "score": round(float(row[c]), 4)}
                      for c in best if row[c] >= self.score_threshold]
            out.append(Prediction({"width": width, "height": height, "labels": labels}))
        return out

    def _label(self, class_id: int) -> str:
        return self.labels[class_id] if class_id < len(self.labels) else str(class_id)


class TorchClassifier(OnnxClassifier):
    """The same classifier on a TorchScript or torch.export file (backend `torch`)."""

    on_torch = True


def _are_probabilities(scores: np.ndarray) -> bool:
    return bool(scores.min() >= 0 and scores.max() <= 1 and np.allclose(scores.sum(axis=1), 1, atol=1e-3))


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
