"""How a model's preprocessing sizes a frame, so the decoder can DCT-scale a large JPEG to no
less than what the model keeps of it (libjpeg-turbo decodes at 1/2, 1/4 or 1/8 scale for a
fraction of the cost; the model would shrink the frame anyway).

Three rules cover the preprocessing of the models sightstream serves:
- `fit`: scaled to fit inside width x height, aspect kept (a letterbox: YOLO, RetinaFace;
  a longest-edge cap is `fit(edge, edge)`);
- `cover`: each side scaled to at least width x height (a resize to a fixed size that ignores the
  aspect, as ViT, BLIP, RT-DETR and Florence-2 processors do, or a resize then a centre crop);
- `edges`: the shortest edge scaled to `shortest`, unless the longest would pass `longest`
  (DETR and Grounding DINO: 800 and 1333).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class InputShape:
    rule: Literal["fit", "cover", "edges"]
    width: int  # edges: the shortest edge
    height: int  # edges: the cap on the longest edge (0: none)

    @classmethod
    def fit(cls, width: int, height: int) -> InputShape:
        return cls("fit", width, height)

    @classmethod
    def cover(cls, width: int, height: int) -> InputShape:
        return cls("cover", width, height)

    @classmethod
    def edges(cls, shortest: int, longest: int | None = None) -> InputShape:
        return cls("edges", shortest, longest or 0)

    def scale(self, width: int, height: int) -> float:
        """The factor the model's preprocessing scales a width x height frame by (the larger of
        the two, for a resize that ignores the aspect)."""
        if self.rule == "fit":
            return min(self.width / width, self.height / height)
        if self.rule == "cover":
            return max(self.width / width, self.height / height)
        scale = self.width / min(width, height)
        return min(scale, self.height / max(width, height)) if self.height else scale
