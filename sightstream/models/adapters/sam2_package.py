"""SAM2 through Meta's own `sam2` package (backend "sam2"): a checkpoint `.pt` and a config of
that package, for users who have its weights rather than a transformers folder.

The package is optional and installed with `--no-deps` (make setup does; see docs/models.md):
its declared requirements pull torchvision and a CUDA torch. Only its predictors import
torchvision, so this adapter drives the model itself, as `SAM2ImagePredictor` does: one image
encoder pass per batch, then the prompt encoder and mask decoder per image. Prompts and results
are those of the transformers SAM2 adapter (hf_sam2), chained pipelines included.

Options: `config` (a config of the package, default "configs/sam2.1/sam2.1_hiera_t.yaml"),
`hydra_overrides` (a list, e.g. ["++model.image_size=512"]), `dtype` (GPUs compute under
autocast in this type, default bfloat16, as Meta's predictor does; the CPU in float32).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sightstream.errors import ModelError, ModelNotAvailable
from sightstream.frames import Prediction
from sightstream.models.adapter import FrameContext, Prompt
from sightstream.models.adapters.hf_common import memory_mb, torch_device, torch_dtype
from sightstream.models.adapters.hf_sam2 import check_prompt, masks_prediction, preprocess, segment_each

DEFAULT_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"


class Sam2Package:
    task = "segment"
    takes_prompt = True
    check_prompt = staticmethod(check_prompt)
    chained_prompt_keeps_labels = True  # chained, its boxes come from upstream: a prompt only keeps labels
    uses_context = True
    input_size: tuple[int, int] | None = None

    def __init__(self, path: str, options: dict[str, Any]) -> None:
        self._path = path
        self._config = str(options.get("config", DEFAULT_CONFIG))
        self._overrides = list(options.get("hydra_overrides", []))
        self._dtype_name = str(options.get("dtype", "bfloat16"))
        self._model: Any = None
        self.memory_mb = 0.0

    def load(self, device: str) -> None:
        try:
            from sam2.build_sam import build_sam2
        except ImportError:
            raise ModelNotAvailable(
                "the `sam2` package is not installed: `make setup` installs it, or "
                "SAM2_BUILD_CUDA=0 pip install --no-deps --no-build-isolation sam2==1.1.0 plus "
                "the `sam2` extra (its own requirements would replace torch)"
            ) from None
        try:
            model = build_sam2(self._config, self._path or None, device=str(torch_device(device)),
                               mode="eval", hydra_overrides_extra=self._overrides)
        except (FileNotFoundError, RuntimeError, KeyError, ValueError) as e:
            raise ModelError(f"sam2 cannot build {self._config} from {self._path}: {e}") from None
        self._dtype = torch_dtype(self._dtype_name)
        self._model = model
        self.memory_mb = memory_mb(model)

    def unload(self) -> None:
        self._model = None

    def infer(self, images: list[np.ndarray], prompt: Prompt | None = None,
              contexts: list[FrameContext] | None = None) -> list[Prediction]:
        import torch

        device = next(self._model.parameters()).device
        if device.type != "cuda":
            return segment_each(images, prompt, contexts, self._features, self._segment)
        # As Meta's own predictor runs on GPUs: weights in float32, compute in `dtype`.
        with torch.autocast("cuda", dtype=self._dtype):
            return segment_each(images, prompt, contexts, self._features, self._segment)

    def _features(self, images: list[np.ndarray]) -> list[Any]:
        """The image encoder's feature maps, highest resolution first (SAM2ImagePredictor's
        set_image_batch)."""
        import torch

        model = self._model
        device = next(model.parameters()).device
        pixels = torch.tensor(preprocess(images, model.image_size)).to(device)
        backbone = model.forward_image(pixels)
        _, vision_feats, _, sizes = model._prepare_backbone_features(backbone)
        if model.directly_add_no_mem_embed:
            vision_feats[-1] = vision_feats[-1] + model.no_mem_embed
        n = pixels.shape[0]
        return [feat.permute(1, 2, 0).view(n, -1, *size) for feat, size in zip(vision_feats, sizes)]

    def _segment(self, features: list[Any], image: np.ndarray, spec: dict[str, Any],
                 described: list[dict]) -> Prediction:
        """Prompt encoder and mask decoder on one image (SAM2ImagePredictor's _predict)."""
        import torch

        model = self._model
        device = features[-1].device
        h, w = image.shape[:2]
        scale = torch.tensor([model.image_size / w, model.image_size / h], device=device)
        if spec["boxes"]:
            coords = torch.tensor(spec["boxes"], dtype=torch.float32, device=device).reshape(-1, 2, 2) * scale
            labels = torch.tensor([[2, 3]], dtype=torch.int, device=device).repeat(coords.shape[0], 1)
        else:
            coords = torch.tensor(spec["points"], dtype=torch.float32, device=device)[:, None, :] * scale
            labels = torch.tensor(spec["point_labels"], dtype=torch.int, device=device)[:, None]
        sparse, dense = model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        low_res, iou, _, _ = model.sam_mask_decoder(
            image_embeddings=features[-1], image_pe=model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
            repeat_image=coords.shape[0] > 1, high_res_features=features[:-1],
        )
        full = torch.nn.functional.interpolate(low_res.float(), size=(h, w), mode="bilinear",
                                               align_corners=False)[:, 0] > 0
        return masks_prediction(full.cpu().numpy(), iou[:, 0].float().cpu().numpy(), described, w, h)
