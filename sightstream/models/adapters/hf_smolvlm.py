"""SmolVLM (transformers' Idefics3 classes: SmolVLM-256M/500M-Instruct) and SmolVLM2 (its
SmolVLM classes): captions and answers from a small chat VLM, with batched generation.

The model loads through AutoModelForImageTextToText (the class the folder's config names).
SmolVLM2's processor class needs torchvision (for video) and num2words, so the adapter builds
Idefics3's processor, which is the same for images, from the folder's parts for both: the image
processor (transformers' PIL one without torchvision), the tokenizer, the chat template and
`image_seq_len`. It writes the chat turn (a user message: the image, then the question), pads
on the left and generates greedily; only the new tokens are decoded. Result: `{"text": "..."}`.

Tiling: SmolVLM scales a frame's longest edge to `size` (2048 px for the 256M) and splits it
into tiles of the encoder's input (512 px) plus the whole frame: 13 encoder passes and 832
image tokens for a 16:9 frame. On a camera stream that costs far too much per frame, so by
default a frame is one tile (the whole frame squeezed to 512 x 512, as the model's own global
view of it is: 64 image tokens); `do_image_splitting = true` brings the tiles back, for small
text or details, and `longest_edge` bounds how many (1024: a 2 x 2 grid at most).
Options: `task` (caption | vqa), `max_new_tokens` (64), `caption_question` (the question asked
for captions: "Describe this image in one sentence."), `do_image_splitting` (false),
`longest_edge` (with splitting: the checkpoint's), `dtype`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sightstream.frames import Prediction
from sightstream.models.adapter import Prompt
from sightstream.models.adapters import hf_common
from sightstream.models.input_shape import InputShape

# The turn SmolVLM's chat template writes, for a folder that has no template.
TURN = "<|im_start|>User:<image>{question}<end_of_utterance>\nAssistant:"


class HfSmolVLM(hf_common.ImageToText):
    def __init__(self, path: str, options: dict[str, Any]) -> None:
        super().__init__(path, options)
        self.split = bool(options.get("do_image_splitting", False))

    def load(self, device: str) -> None:
        source = self.source()
        from transformers import AutoModelForImageTextToText, Idefics3Processor

        images: dict[str, Any] = {"do_image_splitting": self.split}
        if not self.split:
            images["do_resize"] = False  # straight to the tile: the first resize (to `size`) is for tiling
        elif "longest_edge" in self._options:
            images["size"] = {"longest_edge": int(self._options["longest_edge"])}
        self._processor = Idefics3Processor.from_pretrained(source, **images)
        self._processor.tokenizer.padding_side = "left"  # batched generation continues every row at its end
        self.placed(AutoModelForImageTextToText.from_pretrained(source), device)

    @property
    def input_shape(self) -> InputShape | None:
        """One tile: the frame is resized to a max_image_size square, aspect ignored. Tiling
        resizes to `size`, then up to whole tiles: frames are left at full size."""
        processor = getattr(self, "_processor", None)
        if processor is None or self.split:
            return None
        side = int(processor.image_processor.max_image_size["longest_edge"])
        return InputShape.cover(side, side)

    def turn(self, question: str) -> str:
        """The chat turn for one image and `question`, ending where the answer starts."""
        if not self._processor.chat_template:
            return TURN.format(question=question)
        message = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
        return str(self._processor.apply_chat_template([message], add_generation_prompt=True))

    def prepare(self, images: list[np.ndarray], prompt: Prompt | None = None,
                contexts: Any = None) -> hf_common.Inputs:
        text = self.turn(self.question(prompt))
        tensors = self._processor(images=[[image] for image in images], text=[text] * len(images),
                                  padding=True, padding_side="left", return_tensors="pt")
        return self.host_inputs(tensors, images)

    def infer(self, inputs: hf_common.Inputs) -> Any:
        return self.on_device(inputs, lambda tensors: self._model.generate(
            **tensors, max_new_tokens=self.max_new_tokens, do_sample=False))

    def finish(self, inputs: hf_common.Inputs, ids: Any) -> list[Prediction]:
        return [Prediction({"text": t}) for t in hf_common.new_text(self._processor, inputs, ids)]
