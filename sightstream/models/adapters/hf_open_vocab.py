"""Open-vocabulary detection from transformers: OWL-ViT, OWLv2 and Grounding DINO (any
`AutoModelForZeroShotObjectDetection`). The prompt names what to find: "person. car. red bag"
(labels split on `.`, `,`, `;` or new lines); each detection's label is one of them."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from sightstream.errors import ModelError
from sightstream.frames import Prediction
from sightstream.models.adapter import Prompt
from sightstream.models.adapters import hf_common


def prompt_labels(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"[.,;\n]", text) if s.strip()]


class HfOpenVocabDetector(hf_common.HfAdapter):
    task = "detect"
    takes_prompt = True

    @staticmethod
    def check_prompt(text: str, task: str) -> None:
        if not prompt_labels(text):
            raise ModelError('an open-vocabulary detector needs labels to find, e.g. "person. red car"')

    def __init__(self, path: str, options: dict[str, Any]) -> None:
        super().__init__(path, options)
        self.score_threshold = float(options.get("score_threshold", 0.1))
        self.text_threshold = float(options.get("text_threshold", 0.25))  # Grounding DINO only

    def load(self, device: str) -> None:
        source = self.source()
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        self._processor = AutoProcessor.from_pretrained(source)
        self.placed(AutoModelForZeroShotObjectDetection.from_pretrained(source), device)
        self._kind = self._model.config.model_type  # owlvit | owlv2 | grounding-dino

    def prepare(self, images: list[np.ndarray], prompt: Prompt | None = None,
                contexts: Any = None) -> hf_common.Inputs:
        labels = prompt_labels(prompt.text) if prompt else []
        if not labels:  # nothing asked for: nothing to run
            return hf_common.Inputs({}, [img.shape[:2] for img in images], {"labels": labels})
        if self._kind == "grounding-dino":
            text = ". ".join(labels) + "."
            inputs = self._processor(images=images, text=[text] * len(images), return_tensors="pt",
                                     padding=True)
        else:
            inputs = self._processor(text=[labels] * len(images), images=images, return_tensors="pt",
                                     padding=True, truncation=True)
        return self.host_inputs(inputs, images, labels=labels)

    def infer(self, inputs: hf_common.Inputs) -> Any:
        if not inputs.tensors:
            return None
        return self.on_device(inputs, lambda tensors: self._model(**tensors))

    def finish(self, inputs: hf_common.Inputs, outputs: Any) -> list[Prediction]:
        labels, sizes = inputs.extra["labels"], inputs.sizes
        if outputs is None:
            return [Prediction({"width": w, "height": h, "detections": []}) for h, w in sizes]
        # OWLv2 pads frames to a square before resizing: its boxes are relative to that square.
        targets = [(max(h, w), max(h, w)) if self._kind == "owlv2" else (h, w) for h, w in sizes]
        if self._kind == "grounding-dino":
            found = self._processor.post_process_grounded_object_detection(
                outputs, inputs.tensors["input_ids"], threshold=self.score_threshold,
                text_threshold=self.text_threshold, target_sizes=targets,
            )
        else:
            found = self._processor.post_process_grounded_object_detection(
                outputs, threshold=self.score_threshold, target_sizes=targets,
                text_labels=[labels] * len(sizes),
            )
        return [_prediction(r, h, w, labels) for r, (h, w) in zip(found, sizes)]


def match_label(phrase: str, labels: list[str]) -> tuple[str, int]:
    """A prompt label for the phrase a model attached to a box (Grounding DINO returns the
    matched text span): the label itself, else the first label the phrase contains."""
    if phrase in labels:
        return phrase, labels.index(phrase)
    for i, label in enumerate(labels):
        if label in phrase:
            return label, i
    return phrase, -1


def _prediction(found: dict, height: int, width: int, labels: list[str]) -> Prediction:
    # `text_labels` when present; reading `labels` of Grounding DINO's output warns.
    names = found["text_labels"] if "text_labels" in found else found.get("labels")
    detections = []
    for i in found["scores"].float().argsort(descending=True).tolist():
        x1, y1, x2, y2 = (float(v) for v in found["boxes"][i].float().tolist())
        box = [round(min(max(x1, 0), width), 1), round(min(max(y1, 0), height), 1),
               round(min(max(x2, 0), width), 1), round(min(max(y2, 0), height), 1)]
        label, class_id = match_label(str(names[i]) if names is not None else "", labels)
        detections.append({"box": box, "score": round(float(found["scores"][i]), 4), "label": label,
                           "class_id": class_id})
    return Prediction({"width": width, "height": height, "detections": detections})
