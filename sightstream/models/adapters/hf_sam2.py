"""SAM2 through transformers (`Sam2Model`): masks for the objects that the prompt points at.

The prompt is JSON: `{"boxes": [[x1, y1, x2, y2], ...]}` (one object per box) or
`{"points": [[x, y], ...], "point_labels": [1, ...]}` (one object per point; label 1 keeps,
0 excludes), in the frame's pixels. Pre-processing is done here (square resize to the model's
input, ImageNet normalisation): transformers' SAM2 processors need torchvision.

Result: `{"width", "height", "masks": [{"object", "score", "area", "rle"}]}` and, in `mask`, an
8-bit PNG where pixel value k + 1 marks object k (0: none).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from PIL import Image

from sightstream.errors import ModelError
from sightstream.frames import Prediction
from sightstream.models import masks
from sightstream.models.adapter import Prompt
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
    if not all(isinstance(b, list) and len(b) == 4 for b in boxes):
        raise ModelError("each SAM2 box is [x1, y1, x2, y2]")
    if not all(isinstance(p, list) and len(p) == 2 for p in points):
        raise ModelError("each SAM2 point is [x, y]")
    labels = spec.get("point_labels") or [1] * len(points)
    if len(labels) != len(points):
        raise ModelError("`point_labels` needs one label per point")
    return {"boxes": boxes, "points": points, "point_labels": labels}


class HfSam2(hf_common.HfAdapter):
    task = "segment"
    takes_prompt = True

    def load(self, device: str) -> None:
        source = self.source()
        from transformers import Sam2Model

        self.placed(Sam2Model.from_pretrained(source), device)
        size = self._model.config.prompt_encoder_config.image_size
        self._side = int(size[0] if isinstance(size, (list, tuple)) else size)

    def infer(self, images: list[np.ndarray], prompt: Prompt | None = None) -> list[Prediction]:
        import torch

        spec = parse_prompt(prompt.text if prompt else "")
        if not spec["boxes"] and not spec["points"]:
            return [Prediction({"width": i.shape[1], "height": i.shape[0], "masks": []},
                               {"mask": masks.png(np.zeros(i.shape[:2], np.uint8))}) for i in images]
        side = self._side
        pixels = np.stack([
            (np.asarray(Image.fromarray(img).resize((side, side), Image.Resampling.BILINEAR),
                        dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
            for img in images
        ]).transpose(0, 3, 1, 2)
        scales = [np.array([side / img.shape[1], side / img.shape[0]], dtype=np.float32) for img in images]
        kwargs: dict[str, Any] = {}
        if spec["boxes"]:
            boxes = np.asarray(spec["boxes"], dtype=np.float32)
            kwargs["input_boxes"] = torch.tensor(np.stack([boxes * np.tile(s, 2) for s in scales]))
        else:
            pts = np.asarray(spec["points"], dtype=np.float32)
            kwargs["input_points"] = torch.tensor(np.stack([(pts * s)[:, None, :] for s in scales]))
            labels = np.asarray(spec["point_labels"], dtype=np.int64)[:, None]
            kwargs["input_labels"] = torch.tensor(np.stack([labels] * len(images)))
        model = self._model
        with torch.inference_mode():
            out = model(pixel_values=torch.tensor(pixels).to(model.device, model.dtype),
                        multimask_output=False,
                        **{k: v.to(model.device) if k == "input_labels" else v.to(model.device, model.dtype)
                           for k, v in kwargs.items()})
        logits = out.pred_masks[:, :, 0].float()  # [batch, objects, h/4, w/4]
        scores = out.iou_scores[:, :, 0].float().cpu().numpy()
        results = []
        for i, img in enumerate(images):
            h, w = img.shape[:2]
            full = torch.nn.functional.interpolate(logits[i : i + 1], size=(h, w), mode="bilinear",
                                                   align_corners=False)[0] > 0
            results.append(_prediction(full.cpu().numpy(), scores[i], w, h))
        return results


def _prediction(object_masks: np.ndarray, scores: np.ndarray, width: int, height: int) -> Prediction:
    index = np.zeros((height, width), dtype=np.uint8)
    found = []
    for k, mask in enumerate(object_masks):
        index[mask] = min(k + 1, 255)
        found.append({"object": k, "score": round(float(scores[k]), 4), "area": int(mask.sum()),
                      "rle": masks.rle_encode(mask)})
    return Prediction({"width": width, "height": height, "masks": found}, {"mask": masks.png(index)})
