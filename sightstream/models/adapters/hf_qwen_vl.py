"""Qwen2-VL and Qwen2.5-VL: captions and answers from a chat VLM, with batched generation.

Their processor class needs torchvision (for video), so the adapter composes the image
processor and the tokenizer itself: it writes the chat turn, expands the image placeholder
to the number of vision tokens the image yields (grid t*h*w / merge²), pads on the left and
generates. Only the new tokens are decoded. Result: `{"text": "..."}`.
Options: `task` (caption | vqa), `max_new_tokens` (64), `caption_question` (the question
asked for captions: "Describe this image in one sentence."), `min_pixels` / `max_pixels`
(the image processor's resolution bounds), `dtype` on GPUs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sightstream.frames import Prediction
from sightstream.models.adapter import Prompt
from sightstream.models.adapters import hf_common

TURN = ("<|im_start|>user\n<|vision_start|>{image}<|vision_end|>{question}<|im_end|>\n"
        "<|im_start|>assistant\n")


class HfQwenVL(hf_common.ImageToText):
    # Its processor resizes to a pixel budget (min_pixels..max_pixels, kept in `size` as
    # shortest_edge and longest_edge, though they are pixel counts): frames stay at full size.
    input_shape = None

    def load(self, device: str) -> None:
        source = self.source()
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        bounds = {k: int(self._options[k]) for k in ("min_pixels", "max_pixels") if k in self._options}
        self._images = AutoImageProcessor.from_pretrained(source, **bounds)
        self._tokenizer = AutoTokenizer.from_pretrained(source)
        self._tokenizer.padding_side = "left"  # batched generation continues every row at its end
        self.placed(AutoModelForImageTextToText.from_pretrained(source), device)
        self._pad = self._tokenizer.convert_ids_to_tokens(self._model.config.image_token_id)
        self._merge = int(self._model.config.vision_config.spatial_merge_size)

    def prepare(self, images: list[np.ndarray], prompt: Prompt | None = None,
                contexts: Any = None) -> hf_common.Inputs:
        question = self.question(prompt)
        vision = self._images(images=images, return_tensors="pt")
        grids = vision["image_grid_thw"]
        texts = [TURN.format(image=self._pad * (int(g.prod()) // self._merge**2), question=question)
                 for g in grids]
        tokens = self._tokenizer(texts, return_tensors="pt", padding=True)
        return self.host_inputs({**tokens, **vision}, images)

    def infer(self, inputs: hf_common.Inputs) -> Any:
        return self.on_device(inputs, lambda tensors: self._model.generate(
            **tensors, max_new_tokens=self.max_new_tokens, do_sample=False))

    def finish(self, inputs: hf_common.Inputs, ids: Any) -> list[Prediction]:
        return [Prediction({"text": t}) for t in hf_common.new_text(self._tokenizer, inputs, ids)]
