"""Image classification from transformers (ViT, ConvNeXt, EfficientNet, …): any
`AutoModelForImageClassification` with its image processor, from a local folder or the local
cache. Result: `{"width", "height", "labels": [{"label", "class_id", "score"}, …]}`, the top
`top_k` (5) classes by softmax score, best first; `score_threshold` (0) drops the rest."""

from __future__ import annotations

from typing import Any

from sightstream.frames import Prediction
from sightstream.models.adapters import hf_common


class HfClassifier(hf_common.ImageModel):
    auto_class = "AutoModelForImageClassification"
    task = "classify"

    def __init__(self, path: str, options: dict[str, Any]) -> None:
        super().__init__(path, options)
        self.top_k = int(options.get("top_k", 5))
        self.score_threshold = float(options.get("score_threshold", 0.0))

    def load(self, device: str) -> None:
        super().load(device)
        self._labels = self._model.config.id2label

    def finish(self, inputs: hf_common.Inputs, outputs: Any) -> list[Prediction]:
        probabilities = outputs.logits.float().softmax(dim=-1)
        k = min(self.top_k, probabilities.shape[-1])
        scores, ids = probabilities.topk(k, dim=-1)
        out = []
        for (h, w), row_scores, row_ids in zip(inputs.sizes, scores.tolist(), ids.tolist()):
            labels = [{"label": str(self._labels.get(cid, cid)), "class_id": cid, "score": round(score, 4)}
                      for score, cid in zip(row_scores, row_ids) if score >= self.score_threshold]
            out.append(Prediction({"width": w, "height": h, "labels": labels}))
        return out
