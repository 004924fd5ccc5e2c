"""A model that finds nothing, for measuring the pipeline itself (`sightstream bench --null`,
`--daemons`): each call sleeps `sleep_ms` (releasing the GIL, as a GPU call does) and returns
an empty detection per image. Usable as a plug-in: adapter =
"sightstream.models.adapters.null:NullModel"."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from sightstream.frames import Prediction
from sightstream.prompts import Prompt


class NullModel:
    task = "detect"
    takes_prompt = False
    uses_context = False

    def __init__(self, path: str, options: dict[str, Any]) -> None:
        self.sleep_s = float(options.get("sleep_ms", 0)) / 1000
        size = options.get("input_size")
        self.input_size: tuple[int, int] | None = (int(size), int(size)) if size else None

    def load(self, device: str) -> None:
        pass

    def unload(self) -> None:
        pass

    def infer(self, images: list[np.ndarray], prompt: Prompt | None = None) -> list[Prediction]:
        if self.sleep_s:
            time.sleep(self.sleep_s)
        return [Prediction({"width": img.shape[1], "height": img.shape[0], "detections": []})
                for img in images]
