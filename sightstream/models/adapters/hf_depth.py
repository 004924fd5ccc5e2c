"""Monocular depth from transformers (Depth Anything v1/v2, DPT, …): any
`AutoModelForDepthEstimation`. Each result is `{"width", "height", "min", "max"}` plus a 16-bit
PNG in the `depth` field: pixel value v means depth min + v / 65535 * (max - min), in the
model's own units (relative inverse depth for Depth Anything)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from sightstream.frames import Prediction
from sightstream.models.adapter import Prompt
from sightstream.models.adapters import hf_common


def depth_png(depth: np.ndarray) -> tuple[bytes, float, float]:
    lo, hi = float(depth.min()), float(depth.max())
    scale = 65535.0 / (hi - lo) if hi > lo else 0.0
    pixels = np.round((depth - lo) * scale).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue(), lo, hi


class HfDepth(hf_common.HfAdapter):
    task = "depth"

    def load(self, device: str) -> None:
        source = self.source()
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        self._processor = AutoImageProcessor.from_pretrained(source)
        self.placed(AutoModelForDepthEstimation.from_pretrained(source), device)

    def infer(self, images: list[np.ndarray], prompt: Prompt | None = None) -> list[Prediction]:
        import torch

        inputs = hf_common.to_device(self._processor(images=images, return_tensors="pt"), self._model)
        with torch.inference_mode():
            outputs = self._model(**inputs)
        sizes = [img.shape[:2] for img in images]
        maps = self._processor.post_process_depth_estimation(outputs, target_sizes=sizes)
        out = []
        for m, (h, w) in zip(maps, sizes):
            png, lo, hi = depth_png(m["predicted_depth"].float().cpu().numpy())
            out.append(Prediction({"width": w, "height": h, "min": round(lo, 6), "max": round(hi, 6)},
                                  {"depth": png}))
        return out
