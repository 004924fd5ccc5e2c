"""OCR with RapidOCR's PP-OCRv6 models (Apache-2.0, ONNX files shipped inside the `rapidocr`
wheel: the `ocr` extra). A detect task: each line of text found is a detection whose `text`
is what it reads; `polygon` is the line's four corners. The result also carries all the text
as `text`, in reading order: rows top to bottom (pieces on one row joined by a space), each
left to right; the detections come in that order too."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from sightstream.errors import ModelNotAvailable
from sightstream.frames import Prediction
from sightstream.models.adapter import Prompt


class RapidOcr:
    task = "detect"
    takes_prompt = False
    uses_context = False
    input_size = None

    def __init__(self, path: str, options: dict[str, Any]) -> None:
        self.score_threshold = float(options.get("score_threshold", 0.5))
        self._models = path  # the wheel's folder of ONNX files: their size is the model's
        self.memory_mb = 0.0
        self._engine: Any = None

    def load(self, device: str) -> None:
        try:
            from rapidocr import RapidOCR
        except ImportError:
            raise ModelNotAvailable("OCR needs the rapidocr wheel: pip install 'sightstream[ocr]'") from None
        params: dict[str, Any] = {"Global.log_level": "warning"}
        if device.startswith("cuda:"):
            params["EngineConfig.onnxruntime.use_cuda"] = True
            params["EngineConfig.onnxruntime.cuda_ep_cfg.device_id"] = int(device.split(":")[1])
        logging.getLogger("RapidOCR").setLevel(logging.WARNING)
        self._engine = RapidOCR(params=params)
        folder = Path(self._models)
        if folder.is_dir():
            self.memory_mb = sum(f.stat().st_size for f in folder.glob("*.onnx")) / 2**20

    def unload(self) -> None:
        self._engine = None

    def infer(self, images: list[np.ndarray], prompt: Prompt | None = None) -> list[Prediction]:
        return [self._one(img) for img in images]  # RapidOCR reads one image per call

    def _one(self, image: np.ndarray) -> Prediction:
        out = self._engine(image)
        h, w = image.shape[:2]
        lines = []
        for polygon, text, score in zip(out.boxes if out.boxes is not None else [], out.txts or (),
                                        out.scores or ()):
            if score < self.score_threshold:
                continue
            pts = np.asarray(polygon, dtype=float)
            x1, y1 = pts.min(axis=0)
            x2, y2 = pts.max(axis=0)
            lines.append({
                "box": [round(float(max(x1, 0)), 1), round(float(max(y1, 0)), 1),
                        round(float(min(x2, w)), 1), round(float(min(y2, h)), 1)],
                "score": round(float(score), 4), "label": "text", "class_id": 0, "text": text,
                "polygon": [[round(float(x), 1), round(float(y), 1)] for x, y in pts],
            })
        rows = _rows(lines)
        return Prediction({"width": w, "height": h, "detections": [d for row in rows for d in row],
                           "text": "\n".join(" ".join(d["text"] for d in row) for row in rows)})


def _rows(found: list[dict]) -> list[list[dict]]:
    """The pieces of text in reading order: rows top to bottom, each left to right. A piece is
    on a row when their middles are each within the other's height: words of one line are
    rarely found at the same height ("2026" a pixel above "HELLO" read as the first line), and
    a tall heading beside two small lines is a row of its own, not one with both."""
    rows: list[list[dict]] = []
    for d in sorted(found, key=lambda d: d["box"][1]):
        row = next((r for r in rows if _same_row(r[-1], d)), None)
        if row is None:
            rows.append([d])
        else:
            row.append(d)
    return [sorted(row, key=lambda d: d["box"][0]) for row in rows]


def _same_row(a: dict, b: dict) -> bool:
    (_, a1, _, a2), (_, b1, _, b2) = a["box"], b["box"]
    return a1 <= (b1 + b2) / 2 <= a2 and b1 <= (a1 + a2) / 2 <= b2
