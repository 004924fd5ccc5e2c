"""ONNX semantic segmentation, configured as Trifecta users do: `input_size`, `mean`, `std`
(on 0-1 pixels), `input_name`, `output_name`, `background_class_id`, `labels`.

The model's output is either per-class scores [batch, classes, h, w] (argmax is taken) or class
ids [batch, h, w]. The class map is resized (nearest) to the frame's size. Result:
`{"width", "height", "masks": [{"class_id", "label", "area", "rle": COCO RLE}]}` (one mask
per class present, background left out), and a PNG class map (8-bit, or 16-bit past 255
classes) in the `mask` field. `packbits = true` adds each mask as base64 packbits.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from sightstream.errors import BatchSizeMismatch, ModelError
from sightstream.frames import Prediction
from sightstream.models import masks
from sightstream.models.adapter import FrameContext, Prompt, label_list
from sightstream.models.adapters.runner import OnFile, Runner


class OnnxSegmenter(OnFile):
    task = "segment"
    takes_prompt = False
    uses_context = False

    def __init__(self, path: str, options: dict[str, Any]) -> None:
        self._path = path
        size = options.get("input_size", 512)
        w, h = (size, size) if isinstance(size, int) else size
        self.input_size = (int(w), int(h))
        self.mean = np.asarray(options.get("mean", [0.485, 0.456, 0.406]), dtype=np.float32)
        self.std = np.asarray(options.get("std", [0.229, 0.224, 0.225]), dtype=np.float32)
        self.input_name = options.get("input_name")
        self.output_name = options.get("output_name")
        self.background = options.get("background_class_id", 0)
        self.labels: list[str] = label_list(options)
        self.with_packbits = bool(options.get("packbits", False))
        self._options = options
        self._model: Runner | None = None

    def load(self, device: str) -> None:
        # a torch file's outputs are named by its answer to the warm-up
        self._model, self.input_size = self._open_fixed(device, self.input_size)
        self._check_names()

    def _check_names(self) -> None:
        assert self._model is not None
        names, outputs = self._model.inputs, self._model.outputs
        self.input_name = self.input_name or names[0]
        self.output_name = self.output_name or outputs[0]
        if self.input_name not in names or self.output_name not in outputs:
            raise ModelError(f"the model's inputs are {names} and outputs {outputs}; "
                             "fix input_name / output_name")

    def unload(self) -> None:
        self._model = None

    def prepare(
        self, images: list[np.ndarray], prompt: Prompt | None = None,
        contexts: list[FrameContext] | None = None,
    ) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """The normalised NCHW batch, and each image's (width, height)."""
        w, h = self.input_size
        assert self._model is not None, "load() first"
        batch = self._model.host_buffer((len(images), 3, h, w))
        for i, img in enumerate(images):
            resized = np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BILINEAR))
            batch[i] = ((resized.astype(np.float32) / 255.0 - self.mean) / self.std).transpose(2, 0, 1)
        return batch, [(img.shape[1], img.shape[0]) for img in images]

    def infer(self, prepared: tuple[np.ndarray, list[tuple[int, int]]]) -> np.ndarray:
        assert self._model is not None, "load() first"
        outputs = self._model.run(prepared[0], self.input_name)
        return dict(zip(self._model.outputs, outputs))[str(self.output_name)]  # checked at load

    def finish(
        self, prepared: tuple[np.ndarray, list[tuple[int, int]]], raw: np.ndarray
    ) -> list[Prediction]:
        sizes = prepared[1]
        classes = raw.argmax(axis=1) if raw.ndim == 4 else raw  # per-class scores, or class ids
        if len(classes) != len(sizes):
            raise BatchSizeMismatch(f"the model returned {len(classes)} maps for {len(sizes)} images")
        return [self._prediction(classes[i], w, h) for i, (w, h) in enumerate(sizes)]

    def _prediction(self, class_map: np.ndarray, width: int, height: int) -> Prediction:
        dtype = np.uint8 if class_map.max(initial=0) < 256 else np.uint16
        small = Image.fromarray(class_map.astype(dtype))
        full = np.asarray(small.resize((width, height), Image.Resampling.NEAREST))
        found = []
        for cid in np.unique(full).tolist():
            if cid == self.background:
                continue
            mask = full == cid
            item: dict[str, Any] = {"class_id": int(cid), "label": self._label(int(cid)),
                                    "area": int(mask.sum()), "rle": masks.rle_encode(mask)}
            if self.with_packbits:
                item["packbits"] = masks.packbits(mask)
            found.append(item)
        return Prediction({"width": width, "height": height, "masks": found}, {"mask": masks.png(full)})

    def _label(self, class_id: int) -> str:
        return self.labels[class_id] if class_id < len(self.labels) else str(class_id)


class TorchSegmenter(OnnxSegmenter):
    """The same segmentation on a TorchScript or torch.export file (backend `torch`). Its
    outputs are named by what the model returns: a dict's keys (torchvision's `out`), else
    output0, output1, …; `output_name` picks one, else the first."""

    on_torch = True
