"""SAM2 through transformers (`Sam2Model`): masks for the objects that the prompt points at.

The prompt is JSON: `{"boxes": [[x1, y1, x2, y2], ...]}` (one object per box) or
`{"points": [[x, y], ...], "point_labels": [1, ...]}` (one object per point; label 1 keeps,
0 excludes), in the frame's pixels. In a chained pipeline (`prompt_from`), each upstream
detection is an object instead, and the prompt may keep only some labels:
`{"labels": ["person"]}`. Pre-processing is done here (square resize to the model's input,
ImageNet normalisation): transformers' SAM2 processors need torchvision.

The vision encoder runs once per batch; the prompt decoder once per image (each image may
have its own objects).

Result: `{"width", "height", "masks": [{"object", "score", "area", "rle"}]}` (plus the
detection's `box`, `label`, `class_id` when chained) and, in `mask`, an 8-bit PNG where pixel
value k + 1 marks object k (0: none).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from sightstream.errors import ModelError
from sightstream.frames import Prediction
from sightstream.models import masks
from sightstream.models.adapter import FrameContext, Prompt
from sightstream.models.adapters import hf_common

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def parse_prompt(text: str) -> dict[str, Any]:
    """The objects to segment, from the prompt's JSON; raises ModelError with what is wrong."""
    try:
        spec = json.loads(text) if text.strip() else {}
    except ValueError:
        raise ModelError('a SAM2 prompt is JSON: {"boxes": [[x1, y1, x2, y2]]} or '
                         '{"points": [[x, y]], "point_labels": [1]}') from None
    if not isinstance(spec, dict):
        raise ModelError("a SAM2 prompt is a JSON object with `boxes` or `points`")
    boxes, points = spec.get("boxes") or [], spec.get("points") or []
    if boxes and points:
        raise ModelError("a SAM2 prompt has `boxes` or `points`, not both")
    if not isinstance(boxes, list) or not all(_numbers(b, 4) for b in boxes):
        raise ModelError("each SAM2 box is [x1, y1, x2, y2], in numbers")
    if not isinstance(points, list) or not all(_numbers(p, 2) for p in points):
        raise ModelError("each SAM2 point is [x, y], in numbers")
    labels = spec.get("point_labels") or [1] * len(points)
    if not isinstance(labels, list) or len(labels) != len(points) or not all(v in (0, 1) for v in labels):
        raise ModelError("`point_labels` needs one label per point, each 1 (keep) or 0 (exclude)")
    keep = spec.get("labels")
    if keep is not None and not (isinstance(keep, list) and all(isinstance(k, str) for k in keep)):
        raise ModelError("`labels` is a list of the upstream detection labels to segment")
    return {"boxes": boxes, "points": points, "point_labels": labels, "labels": keep}


def _numbers(value: Any, n: int) -> bool:
    return (isinstance(value, list) and len(value) == n
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value))


def check_prompt(text: str, task: str = "") -> None:
    """For the control plane and the config: a prompt SAM2 cannot use is refused when it is set.
    Unchained, it must name something to segment or track (a chained pipeline's prompt is
    checked by check_chained_prompt: its boxes come from upstream)."""
    spec = parse_prompt(text)
    if not spec["boxes"] and not spec["points"]:
        raise ModelError('SAM2 segments what its prompt points at: give {"boxes": [[x1, y1, x2, y2]]} or '
                         '{"points": [[x, y]]} (labels alone only filter a chained pipeline\'s detections)')


def objects_of(spec: dict[str, Any], context: FrameContext | None) -> tuple[dict[str, Any], list[dict]]:
    """One image's prompt (boxes or points, in its pixels) and what each object carries into the
    result: an upstream detection's box, label and class when chained, nothing otherwise."""
    if context is None or context.detections is None:
        n = len(spec["boxes"]) or len(spec["points"])
        return spec, [{} for _ in range(n)]
    keep = spec["labels"]
    chosen = [d for d in context.detections if keep is None or d.get("label") in keep]
    described = [{k: d[k] for k in ("box", "label", "class_id") if k in d} for d in chosen]
    return {"boxes": [d["box"] for d in chosen], "points": [], "point_labels": []}, described


def segment_each(
    images: list[np.ndarray], prompt: Prompt | None, contexts: list[FrameContext] | None,
    encode: Callable[[list[np.ndarray]], list[Any]],
    decode: Callable[[list[Any], np.ndarray, dict[str, Any], list[dict]], Prediction],
) -> list[Prediction]:
    """What the SAM2 image adapters share: each image's objects, the image encoder once for the
    images that have any (`encode` gives feature maps with a batch axis), then the prompt
    decoder per image (`decode` takes one image's maps). Images without objects get no masks."""
    import torch

    spec = parse_prompt(prompt.text if prompt else "")
    per_image = [objects_of(spec, contexts[i] if contexts else None) for i in range(len(images))]
    todo = [i for i, (s, _) in enumerate(per_image) if s["boxes"] or s["points"]]
    results = {i: masks_prediction(np.zeros((0, *img.shape[:2]), bool), np.zeros(0), [], *img.shape[1::-1])
               for i, img in enumerate(images) if i not in todo}
    if todo:
        with torch.inference_mode():
            features = encode([images[i] for i in todo])
            for row, i in enumerate(todo):
                results[i] = decode([f[row : row + 1] for f in features], images[i], *per_image[i])
    return [results[i] for i in range(len(images))]


def preprocess(images: list[np.ndarray], side: int) -> np.ndarray:
    """Square resize to the model's input, ImageNet normalisation, NCHW float32."""
    return np.stack([
        (np.asarray(Image.fromarray(img).resize((side, side), Image.Resampling.BILINEAR),
                    dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        for img in images
    ]).transpose(0, 3, 1, 2)


def prompt_tensors(spec: dict[str, Any], width: int, height: int, side: int) -> dict[str, Any]:
    """One image's boxes or points, scaled to the model's square input, as Sam2Model takes them."""
    import torch

    scale = np.array([side / width, side / height], dtype=np.float32)
    if spec["boxes"]:
        boxes = np.asarray(spec["boxes"], dtype=np.float32) * np.tile(scale, 2)
        return {"input_boxes": torch.tensor(boxes[None])}
    points = np.asarray(spec["points"], dtype=np.float32) * scale
    labels = np.asarray(spec["point_labels"], dtype=np.int64)
    return {"input_points": torch.tensor(points[None, :, None, :]),
            "input_labels": torch.tensor(labels[None, :, None])}


class HfSam2(hf_common.HfAdapter):
    task = "segment"
    takes_prompt = True
    check_prompt = staticmethod(check_prompt)
    uses_context = True
    chained_prompt_keeps_labels = True  # chained, its boxes come from upstream: a prompt only keeps labels

    def load(self, device: str) -> None:
        source = self.source()
        from transformers import Sam2Model

        self.placed(Sam2Model.from_pretrained(source), device)
        size = self._model.config.prompt_encoder_config.image_size
        self._side = int(size[0] if isinstance(size, (list, tuple)) else size)

    def infer(self, images: list[np.ndarray], prompt: Prompt | None = None,
              contexts: list[FrameContext] | None = None) -> list[Prediction]:
        return segment_each(images, prompt, contexts, self._encode, self._segment)

    def _encode(self, images: list[np.ndarray]) -> list[Any]:
        import torch

        model = self._model
        pixels = torch.tensor(preprocess(images, self._side)).to(model.device, model.dtype)
        return list(model.get_image_embeddings(pixels))

    def _segment(self, embeddings: list[Any], image: np.ndarray, spec: dict[str, Any],
                 described: list[dict]) -> Prediction:
        """The prompt decoder on one image's embeddings, masks at the image's size."""
        import torch

        model = self._model
        h, w = image.shape[:2]
        inputs = {k: v.to(model.device) if k == "input_labels" else v.to(model.device, model.dtype)
                  for k, v in prompt_tensors(spec, w, h, self._side).items()}
        out = model(image_embeddings=embeddings, multimask_output=False, **inputs)
        logits = out.pred_masks[0, :, 0:1].float()  # [objects, 1, h/4, w/4]
        full = torch.nn.functional.interpolate(logits, size=(h, w), mode="bilinear",
                                               align_corners=False)[:, 0] > 0
        scores = out.iou_scores[0, :, 0].float().cpu().numpy()
        return masks_prediction(full.cpu().numpy(), scores, described, w, h)


def masks_prediction(object_masks: np.ndarray, scores: np.ndarray, described: list[dict], width: int,
                height: int) -> Prediction:
    index = np.zeros((height, width), dtype=np.uint8)
    found = []
    for k, mask in enumerate(object_masks):
        index[mask] = min(k + 1, 255)
        found.append({"object": k, **described[k], "score": round(float(scores[k]), 4),
                      "area": int(mask.sum()), "rle": masks.rle_encode(mask)})
    return Prediction({"width": width, "height": height, "masks": found}, {"mask": masks.png(index)})
