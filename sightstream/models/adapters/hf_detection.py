"""Closed-vocabulary detectors from transformers (DETR, RT-DETR, Conditional/Deformable DETR,
…): any `AutoModelForObjectDetection` with its image processor, from a local folder or cache."""

from __future__ import annotations

from typing import Any

from sightstream.frames import Prediction, empty_box
from sightstream.models.adapters import hf_common


class HfDetector(hf_common.ImageModel):
    auto_class = "AutoModelForObjectDetection"
    task = "detect"

    def __init__(self, path: str, options: dict[str, Any]) -> None:
        super().__init__(path, options)
        self.score_threshold = float(options.get("score_threshold", 0.5))

    def load(self, device: str) -> None:
        super().load(device)
        self._labels = self._model.config.id2label

    def finish(self, inputs: hf_common.Inputs, outputs: Any) -> list[Prediction]:
        found = self._processor.post_process_object_detection(
            outputs, threshold=self.score_threshold, target_sizes=inputs.sizes
        )
        return [_prediction(r, h, w, self._labels) for r, (h, w) in zip(found, inputs.sizes)]


def _prediction(found: dict, height: int, width: int, labels: dict) -> Prediction:
    detections = []
    order = found["scores"].float().argsort(descending=True)
    for i in order.tolist():
        box = [round(float(v), 1) for v in found["boxes"][i].float().clamp(min=0).tolist()]
        box = [min(box[0], width), min(box[1], height), min(box[2], width), min(box[3], height)]
        if empty_box(box):
            continue
        cid = int(found["labels"][i])
        detections.append({"box": box, "score": round(float(found["scores"][i]), 4),
                           "label": labels.get(cid, str(cid)), "class_id": cid})
    return Prediction({"width": width, "height": height, "detections": detections})
