"""Monocular depth from transformers (Depth Anything v1/v2, DPT, …): any
`AutoModelForDepthEstimation`. Each result is `{"width", "height", "min", "max"}` plus a 16-bit
PNG in the `depth` field: pixel value v means depth min + v / 65535 * (max - min), in the
model's own units (relative inverse depth for Depth Anything)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from sightstream.frames import Prediction
from sightstream.models.adapters import hf_common


def depth_png(depth: np.ndarray) -> tuple[bytes, float, float]:
    lo, hi = float(depth.min()), float(depth.max())
    scale = 65535.0 / (hi - lo) if hi > lo else 0.0
    pixels = np.round((depth - lo) * scale).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue(), lo, hi


class HfDepth(hf_common.ImageModel):
    auto_class = "AutoModelForDepthEstimation"
    task = "depth"

    def finish(self, inputs: hf_common.Inputs, outputs: Any) -> list[Prediction]:
        maps = self._processor.post_process_depth_estimation(outputs, target_sizes=inputs.sizes)
        out = []
        for m, (h, w) in zip(maps, inputs.sizes):
            png, lo, hi = depth_png(m["predicted_depth"].float().cpu().numpy())
            # + 0.0: -0.0 (a rounded tiny negative) reads as 0.0
            lo, hi = round(lo, 6) + 0.0, round(hi, 6) + 0.0
            out.append(Prediction({"width": w, "height": h, "min": lo, "max": hi}, {"depth": png}))
        return out
