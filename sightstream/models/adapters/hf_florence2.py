"""Florence-2 in transformers' own format (`Florence2ForConditionalGeneration`, checkpoints such
as florence-community/Florence-2-base): one model, many tasks, each asked for by a task token.

The entry's `task` says what its results are: `caption` (`{"text": "..."}`) or `detect`
(`{"width","height","detections"}`). The pipeline's prompt picks the task token, optionally
followed by text; an empty prompt asks for `<CAPTION>` (caption) or `<OD>` (detect):
- caption: `<CAPTION>`, `<DETAILED_CAPTION>`, `<MORE_DETAILED_CAPTION>`, `<OCR>`.
- detect: `<OD>`, `<DENSE_REGION_CAPTION>` (labels are descriptions), `<REGION_PROPOSAL>`
  (label "region"), `<CAPTION_TO_PHRASE_GROUNDING>` + phrases, `<OPEN_VOCABULARY_DETECTION>` +
  what to find (an object outlined instead of boxed has `polygons`: lists of [x, y] around its
  box), `<OCR_WITH_REGION>` (each line: label "text", its `text` and 4-corner `polygon`;
  the result's `text` holds the lines). Plain text without a token is phrase grounding of it.
A token of the other kind, an unknown token, or text after a token that takes none is refused
(`check_prompt`, and the frame dead-letters `model_error`): a result's `task` is always true.
Captions are the generated text without special tokens.
Florence-2 gives no confidence: every detection's `score` is 1.0. `class_id` numbers the labels
in the order they first appear in that result. Boxes are in the image's pixels (the model's
1000 location bins per side, centre of the bin, as the processor's `post_process_generation`
maps them).
Options: `max_new_tokens` (64 for caption entries, 256 for detect: about 40 objects; raise it
for `<MORE_DETAILED_CAPTION>` or `<OCR>` of long text), `num_beams` (1: greedy; Florence's model
cards use 3: slower, a little better), `dtype`.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from sightstream.errors import ModelError
from sightstream.frames import Prediction
from sightstream.models.adapter import Prompt
from sightstream.models.adapters import hf_common

TEXT_TOKENS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>", "<OCR>")
DETECT_TOKENS = ("<OD>", "<DENSE_REGION_CAPTION>", "<REGION_PROPOSAL>", "<OCR_WITH_REGION>",
                 "<CAPTION_TO_PHRASE_GROUNDING>", "<OPEN_VOCABULARY_DETECTION>")
# Florence-2 tasks this adapter does not serve: masks, and questions about a region given in
# location bins.
UNSERVED = ("<REFERRING_EXPRESSION_SEGMENTATION>", "<REGION_TO_SEGMENTATION>", "<REGION_TO_CATEGORY>",
            "<REGION_TO_DESCRIPTION>", "<REGION_TO_OCR>")
WITH_TEXT = ("<CAPTION_TO_PHRASE_GROUNDING>", "<OPEN_VOCABULARY_DETECTION>")  # text follows them
DEFAULT_TOKEN = {"caption": "<CAPTION>", "detect": "<OD>"}
MAX_NEW_TOKENS = {"caption": 64, "detect": 256}
TOKEN = re.compile(r"<[A-Z_]+>")
# What may be left of location tokens in a phrase when an output is malformed (cut short).
LEFTOVER = re.compile(r"<?loc_\d+>|</?(?:od|ocr|n?cap|dcap|grounding|seg|sep|region_cap|proposal|poly|and)>")


def parse_prompt(text: str, task: str) -> tuple[str, str]:
    """The task token and the text after it, for an entry of `task`. Raises ModelError."""
    if task not in DEFAULT_TOKEN:
        raise ModelError(f"Florence-2 serves task caption or detect, not {task!r}")
    tokens = TEXT_TOKENS if task == "caption" else DETECT_TOKENS
    text = text.strip()
    if not text:
        return DEFAULT_TOKEN[task], ""
    match = TOKEN.match(text)
    if match is None:
        if task == "caption":
            raise ModelError(f"a Florence-2 caption model takes a task token as its prompt: "
                             f"{', '.join(tokens)}; plain text is for a detect model (phrase grounding)")
        token, rest = "<CAPTION_TO_PHRASE_GROUNDING>", text
    else:
        token, rest = match.group(), text[match.end():].strip()
    if token in UNSERVED:
        raise ModelError(f"{token} is a Florence-2 task that sightstream does not serve (no masks or "
                         f"region questions); a {task} model takes {', '.join(tokens)}")
    if token not in TEXT_TOKENS + DETECT_TOKENS:
        raise ModelError(f"unknown Florence-2 task token {token}: a {task} model takes {', '.join(tokens)}")
    if token not in tokens:
        gives, other = ("text", "caption") if token in TEXT_TOKENS else ("boxes", "detect")
        raise ModelError(f"{token} gives {gives}, and this is a {task} model: use {token} with a "
                         f'Florence-2 entry of task = "{other}", or here one of {", ".join(tokens)}')
    if TOKEN.search(rest):
        raise ModelError(f"one task token per prompt: {rest!r} after {token} holds another")
    if token in WITH_TEXT and not rest:
        raise ModelError(f'{token} needs what to find after it, e.g. "{token}a red car"')
    if token not in WITH_TEXT and rest:
        raise ModelError(f"{token} takes no text after it")
    return token, rest


class HfFlorence2(hf_common.HfAdapter):
    takes_prompt = True

    @staticmethod
    def check_prompt(text: str, task: str) -> None:
        parse_prompt(text, task)

    def __init__(self, path: str, options: dict[str, Any]) -> None:
        super().__init__(path, options)
        self.task = str(options.get("task", "caption"))
        self.max_new_tokens = int(options.get("max_new_tokens", MAX_NEW_TOKENS.get(self.task, 64)))
        self.num_beams = int(options.get("num_beams", 1))

    def load(self, device: str) -> None:
        source = self.source()
        from transformers import AutoProcessor, Florence2ForConditionalGeneration

        try:
            self._processor = AutoProcessor.from_pretrained(source)
            model, info = Florence2ForConditionalGeneration.from_pretrained(source, output_loading_info=True)
        except (AttributeError, KeyError, ValueError, TypeError) as e:
            raise ModelError(f"{self._source} does not load as a Florence-2 checkpoint in transformers' own "
                             f"format: {e}") from None
        if info["missing_keys"] or not hasattr(self._processor, "post_process_generation"):
            raise ModelError(
                f"{self._source} is not in transformers' own Florence-2 format ({len(info['missing_keys'])} "
                f"weights missing, processor {type(self._processor).__name__}); microsoft/Florence-2-* need "
                "trust_remote_code, which sightstream never runs: use florence-community/Florence-2-base "
                "or -large")
        positions = int(model.config.text_config.max_position_embeddings)
        if self.max_new_tokens >= positions:
            raise ModelError(f"max_new_tokens {self.max_new_tokens}: this model writes at most "
                             f"{positions - 1}")
        self._positions = positions
        self.placed(model, device)

    def prepare(self, images: list[np.ndarray], prompt: Prompt | None = None,
                contexts: Any = None) -> hf_common.Inputs:
        token, rest = parse_prompt(prompt.text if prompt else "", self.task)
        inputs = self._processor(images=images, text=[token + rest] * len(images), return_tensors="pt")
        length = int(inputs["input_ids"].shape[1])
        if length > self._positions:
            raise ModelError(f"the prompt is too long: with the image it makes {length} tokens, and "
                             f"Florence-2 reads at most {self._positions}")
        return self.host_inputs(inputs, images, token=token)

    def infer(self, inputs: hf_common.Inputs) -> Any:
        return self.on_device(inputs, lambda tensors: self._model.generate(
            **tensors, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=False))

    def finish(self, inputs: hf_common.Inputs, ids: Any) -> list[Prediction]:
        token = inputs.extra["token"]
        if token in TEXT_TOKENS:
            texts = self._processor.batch_decode(ids, skip_special_tokens=True)
            return [Prediction({"text": t.strip()}) for t in texts]
        tokenizer = self._processor.tokenizer
        out = []
        for row, (h, w) in zip(ids, inputs.sizes):
            text = tokenizer.decode(row, skip_special_tokens=False).replace(tokenizer.pad_token or "", "")
            out.append(detections(self._processor, text, token, w, h))
        return out


def detections(processor: Any, text: str, token: str, width: int, height: int) -> Prediction:
    """A detect result from Florence-2's generated text (with its `<loc_N>` tokens), parsed by the
    processor's `post_process_generation` for an image of width x height."""
    parsed = processor.post_process_generation(text, task=token, image_size=(width, height))[token]
    found: list[dict[str, Any]] = []  # label, box and any more fields, in the model's order
    if token == "<OCR_WITH_REGION>":
        for quad, line in zip(parsed["quad_boxes"], parsed["labels"]):
            corners = _points(quad)
            found.append({"label": "text", "box": _extent(corners), "text": _clean(line), "polygon": corners})
    else:
        labels = parsed.get("labels", parsed.get("bboxes_labels", []))
        for box, label in zip(parsed["bboxes"], labels):
            found.append({"label": label, "box": _extent(_points(box))})
        # <OPEN_VOCABULARY_DETECTION> may outline an object with polygons instead of a box.
        for polygons, label in zip(parsed.get("polygons", []), parsed.get("polygons_labels", [])):
            parts = [_points(p) for p in polygons if len(p) >= 2]
            if parts:
                found.append({"label": label, "box": _extent([pt for part in parts for pt in part]),
                              "polygons": parts})
    names: list[str] = []
    dets = []
    for d in found:
        label = _clean(d.pop("label")) or "region"  # region proposals have no label
        if label not in names:
            names.append(label)
        x1, y1, x2, y2 = d.pop("box")
        box = [round(min(max(x1, 0), width), 1), round(min(max(y1, 0), height), 1),
               round(min(max(x2, 0), width), 1), round(min(max(y2, 0), height), 1)]
        dets.append({"box": box, "score": 1.0, "label": label, "class_id": names.index(label), **d})
    result: dict[str, Any] = {"width": width, "height": height, "detections": dets}
    if token == "<OCR_WITH_REGION>":
        result["text"] = "\n".join(d["text"] for d in dets)
    return Prediction(result)


def _clean(text: str) -> str:
    return LEFTOVER.sub("", text).strip()


def _points(flat: list[Any]) -> list[list[float]]:
    """[x1, y1, x2, y2, ...] as [[x1, y1], [x2, y2], ...]."""
    return [[float(x), float(y)] for x, y in zip(flat[0::2], flat[1::2])]


def _extent(points: list[list[float]]) -> list[float]:
    """The axis-aligned box [x1, y1, x2, y2] around points (corners in any order)."""
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    return [min(xs), min(ys), max(xs), max(ys)]
