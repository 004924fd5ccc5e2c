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
        text_config = getattr(model.config, "text_config", None)
        self._text_limit = getattr(text_config, "max_position_embeddings", None)
        self._count = hf_common.TokenCounter(self._processor.tokenizer)

    def prompt_problem(self, text: str) -> str | None:
        """A question is read by the text encoder; a caption's start is continued by the decoder,
        so it needs room for `max_new_tokens` more."""
        text, limit = text.strip(), self._text_limit
        if not text or not limit:
            return None
        room = limit if self.task == "vqa" else limit - self.max_new_tokens
        if (n := self._count(text)) > room:
            said = "question" if self.task == "vqa" else "caption's start"
            more = "" if self.task == "vqa" else f" with max_new_tokens {self.max_new_tokens}"
            return f"the {said} is {n} tokens long and this model reads at most {room}{more}: shorten it"
        return None

    def prepare(self, images: list[np.ndarray], prompt: Prompt | None = None,
                contexts: Any = None) -> hf_common.Inputs:
        text = prompt.text.strip() if prompt else ""
        if self.task == "vqa" and not text:
            raise ModelError("a vqa model needs a question: set the pipeline's prompt")
        if (why := self.prompt_problem(text)) is not None:
            raise ModelError(why)
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
