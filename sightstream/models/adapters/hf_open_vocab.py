"""Open-vocabulary detection from transformers: OWL-ViT, OWLv2 and Grounding DINO (any
`AutoModelForZeroShotObjectDetection`). The prompt names what to find: "person. car. red bag"
(labels split on `.`, `,`, `;` or new lines); each detection's label is one of them."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from sightstream.errors import ModelError
from sightstream.frames import Prediction, empty_box
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
        config = self._model.config
        self._kind = config.model_type  # owlvit | owlv2 | grounding-dino
        # Grounding DINO reads the whole prompt at once, OWL each label on its own.
        self._text_limit = int(config.max_text_len if self._kind == "grounding-dino"
                               else config.text_config.max_position_embeddings)
        self._count = hf_common.TokenCounter(self._processor.tokenizer)

    def prompt_problem(self, text: str) -> str | None:
        return self._labels_problem(prompt_labels(text))

    def _labels_problem(self, labels: list[str]) -> str | None:
        limit = self._text_limit
        if self._kind == "grounding-dino":
            if (n := self._count(_grounding_text(labels))) > limit:
                return (f"the prompt is {n} tokens long and this Grounding DINO reads at most {limit}: "
                        "name fewer or shorter labels")
            return None
        for label in labels:
            if (n := self._count(label)) > limit:
                return (f"the label {label[:80]!r} is {n} tokens long and this {self._kind} model reads at "
                        f"most {limit} per label: shorten it")
        return None

    def prepare(self, images: list[np.ndarray], prompt: Prompt | None = None,
                contexts: Any = None) -> hf_common.Inputs:
        labels = prompt_labels(prompt.text) if prompt else []
        if not labels:  # nothing asked for: nothing to run
            return hf_common.Inputs({}, [img.shape[:2] for img in images], {"labels": labels})
        if (why := self._labels_problem(labels)) is not None:
            raise ModelError(why)
        if self._kind == "grounding-dino":
            inputs = self._processor(images=images, text=[_grounding_text(labels)] * len(images),
                                     return_tensors="pt", padding=True,
                                     input_data_format=hf_common.CHANNELS_LAST)
        else:
            inputs = self._processor(text=[labels] * len(images), images=images, return_tensors="pt",
                                     padding=True, input_data_format=hf_common.CHANNELS_LAST)
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


def _grounding_text(labels: list[str]) -> str:
    return ". ".join(labels) + "."


def match_label(phrase: str, labels: list[str]) -> tuple[str, int] | None:
    """The prompt label for the phrase a model attached to a box (Grounding DINO returns the
    matched text span, lower-cased by its tokenizer and with punctuation split off): the label
    itself, else the first label the phrase contains, else the first label that holds all the
    phrase's words (a span of part of a label), compared without case or punctuation. None: the
    phrase is none of them (an empty span, a separator token), and the box is not reported."""
    if phrase in labels:
        return phrase, labels.index(phrase)
    said = _words(re.sub(r"\[[A-Z]+\]", " ", phrase))  # without [SEP] and its kin
    if not said:
        return None
    named = [_words(label) for label in labels]
    for i, words in enumerate(named):
        if words and _within(words, said):
            return labels[i], i
    for i, words in enumerate(named):
        if set(said) <= set(words):
            return labels[i], i
    return None


def _words(text: str) -> list[str]:
    return re.sub(r"[^\w\s]", " ", text.casefold()).split()


def _within(words: list[str], said: list[str]) -> bool:
    """`words` appear together, in order, in `said`."""
    n = len(words)
    return any(said[k:k + n] == words for k in range(len(said) - n + 1))


def _prediction(found: dict, height: int, width: int, labels: list[str]) -> Prediction:
    # `text_labels` when present; reading `labels` of Grounding DINO's output warns.
    names = found["text_labels"] if "text_labels" in found else found.get("labels")
    detections = []
    for i in found["scores"].float().argsort(descending=True).tolist():
        x1, y1, x2, y2 = (float(v) for v in found["boxes"][i].float().tolist())
        w, h = float(width), float(height)  # a clipped coordinate is a float like the others
        box = [round(min(max(x1, 0.0), w), 1), round(min(max(y1, 0.0), h), 1),
               round(min(max(x2, 0.0), w), 1), round(min(max(y2, 0.0), h), 1)]
        if empty_box(box):
            continue
        if (matched := match_label(str(names[i]) if names is not None else "", labels)) is None:
            continue
        label, class_id = matched
        detections.append({"box": box, "score": round(float(found["scores"][i]), 4), "label": label,
                           "class_id": class_id})
    return Prediction({"width": width, "height": height, "detections": detections})
