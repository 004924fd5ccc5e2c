"""Image-to-text from transformers: captions (`task = "caption"`) and answers to a question
(`task = "vqa"`, the question is the pipeline's prompt), with batched generation.

BLIP and its kin (a processor taking images and text) are served directly; for captions the
prompt, if any, is the start of the caption ("a photograph of"). Result: `{"text": "..."}`.
Options: `max_new_tokens` (64), `num_beams` (1), `dtype` on GPUs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sightstream.errors import ModelError
from sightstream.frames import Prediction
from sightstream.models.adapter import Prompt
from sightstream.models.adapters import hf_common


class HfImageToText(hf_common.ImageToText):
    def __init__(self, path: str, options: dict[str, Any]) -> None:
        super().__init__(path, options)
        self.num_beams = int(options.get("num_beams", 1))

    def load(self, device: str) -> None:
        source = self.source()
        import transformers

        self._processor = transformers.AutoProcessor.from_pretrained(source)
        # A VQA checkpoint must load as its VQA class; the generic image-to-text auto class
        # would map it to the captioning head.
        autos = ["AutoModelForVisualQuestionAnswering", "AutoModelForImageTextToText"]
        if self.task != "vqa":
            autos.reverse()
        errors = []
        for name in autos:
            try:
                model = getattr(transformers, name).from_pretrained(source)
                break
            except (ValueError, KeyError) as e:
                errors.append(f"{name}: {e}")
        else:
            raise ModelError(f"no image-to-text model class loads {source}: {'; '.join(errors)}")
        self.placed(model, device)

    def prepare(self, images: list[np.ndarray], prompt: Prompt | None = None,
                contexts: Any = None) -> hf_common.Inputs:
        text = prompt.text.strip() if prompt else ""
        if self.task == "vqa" and not text:
            raise ModelError("a vqa model needs a question: set the pipeline's prompt")
        kwargs: dict[str, Any] = {"images": images, "return_tensors": "pt"}
        if text:
            kwargs.update(text=[text] * len(images), padding=True)
        return self.host_inputs(self._processor(**kwargs), images)

    def infer(self, inputs: hf_common.Inputs) -> Any:
        return self.on_device(inputs, lambda tensors: self._model.generate(
            **tensors, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams))

    def finish(self, inputs: hf_common.Inputs, ids: Any) -> list[Prediction]:
        texts = self._processor.batch_decode(ids, skip_special_tokens=True)
        return [Prediction({"text": t.strip()}) for t in texts]
