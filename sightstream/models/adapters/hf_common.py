"""What every transformers adapter shares: offline loading (a local folder, or a hub id found in
the local Hugging Face cache, never a download), device and dtype placement, memory size."""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sightstream.errors import ModelError, ModelNotAvailable
from sightstream.models.input_shape import InputShape

# Frames are height x width x 3. Said to processors outright: left to guess, they read an image
# 1 or 3 pixels high as channels first, and fail on it or misread it.
CHANNELS_LAST = "channels_last"


def offline() -> None:
    """No hub access at run time, and no chatter from transformers' logger."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def local_source(source: str) -> str:
    """A local folder, or the cached snapshot of a hub id. Raises ModelNotAvailable."""
    if Path(source).exists():
        return source
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(source, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise ModelNotAvailable(
            f"{source} is neither a local folder nor in the local Hugging Face cache; nothing is "
            f"downloaded at run time: fetch it beforehand (hf download {source}) or "
            "point the entry's path at a local folder"
        ) from None


def torch_device(device: str) -> Any:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        from sightstream.errors import ModelError

        raise ModelError(f"device {device} needs a CUDA build of torch and a GPU")
    return torch.device(device)


def place(model: Any, device: str, options: dict[str, Any]) -> Any:
    """Eval mode on the device, in the `dtype` option (float16 | bfloat16 | float32); by
    default half precision on GPUs, full precision on the CPU."""
    model.eval()
    default = "float16" if device.startswith("cuda") else "float32"
    return model.to(torch_device(device), dtype=torch_dtype(str(options.get("dtype", default))))


def torch_dtype(name: str) -> Any:
    """The `dtype` option's torch type. Raises ModelError naming the choices."""
    import torch

    if name not in ("float16", "bfloat16", "float32"):
        from sightstream.errors import ModelError

        raise ModelError(f"dtype {name!r}: use float16, bfloat16 or float32")
    return getattr(torch, name)


def memory_mb(model: Any) -> float:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def to_device(batch: Any, model: Any, non_blocking: bool = False) -> Any:
    """Move processor outputs to the model's device, floats in the model's dtype."""
    import torch

    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(model.device, non_blocking=non_blocking)
            if value.is_floating_point():
                value = value.to(model.dtype)
        out[key] = value
    return out


def to_host(outputs: Any) -> Any:
    """A model's outputs (a tensor, or a ModelOutput / dict of them) moved to the CPU."""
    import torch

    if isinstance(outputs, torch.Tensor):
        return outputs.cpu()
    for key, value in list(outputs.items()):
        if isinstance(value, torch.Tensor):
            outputs[key] = value.cpu()
    return outputs


@dataclass(slots=True)
class Inputs:
    """A prepared batch: the processor's tensors on the host (pinned when the model is on a
    GPU), each image's (height, width), and whatever else `finish` needs."""

    tensors: dict[str, Any]
    sizes: list[tuple[int, int]]
    extra: dict[str, Any] = field(default_factory=dict)


def check_question(text: str, task: str) -> None:
    """Image-to-text models: a vqa model answers a question, so its prompt cannot be empty."""
    if task == "vqa" and not text.strip():
        raise ModelError("a vqa model needs a question as its prompt")


def new_text(decoder: Any, inputs: Inputs, ids: Any) -> list[str]:
    """What a decoder-only model's `generate` added after the prompt's tokens, decoded, per row
    (`decoder`: its tokenizer or processor)."""
    new = ids[:, inputs.tensors["input_ids"].shape[1]:]
    return [t.strip() for t in decoder.batch_decode(new, skip_special_tokens=True)]


def shape_of(image_processor: Any) -> InputShape | None:
    """How a transformers image processor sizes a frame, from its `size` (None: it does not
    resize, it tiles, or it resizes in a way not known here). Where it is unsure it errs to
    more pixels: a fixed height x width is `cover` even for processors that pad to a square
    first (OWLv2), and a shortest edge followed by a centre crop is the edge before the crop."""
    if not getattr(image_processor, "do_resize", False):
        return None
    tiles = getattr(image_processor, "image_grid_pinpoints", None) or getattr(image_processor,
                                                                           "do_image_splitting", False)
    if tiles:  # tiles cut from a frame resized up to a grid (LLaVA-NeXT, Idefics): keep it whole
        return None
    size = getattr(image_processor, "size", None)

    def get(key: str) -> int:
        value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        return int(value) if value else 0

    if get("height") and get("width"):
        return InputShape.cover(get("width"), get("height"))
    if shortest := get("shortest_edge"):
        crop_pct = getattr(image_processor, "crop_pct", None)  # ConvNeXt: resize to shortest / crop_pct
        if crop_pct and shortest < 384:
            shortest = round(shortest / crop_pct)
        return InputShape.edges(shortest, get("longest_edge"))
    if longest := get("longest_edge"):
        return InputShape.fit(longest, longest)
    return None


class TokenCounter:
    """How many tokens (special ones included) a text is, counted on a private copy of a
    tokenizer under a lock: a fast tokenizer used from two threads at once can fail ("Already
    borrowed"), and the control plane asks while the CPU pool prepares batches."""

    KNOWN = 64  # texts remembered: a pipeline asks about the same prompt for every batch

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = copy.deepcopy(tokenizer)
        self._lock = threading.Lock()
        self._known: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        with self._lock:
            if (n := self._known.get(text)) is None:
                n = len(self._tokenizer(text)["input_ids"])
                if len(self._known) >= self.KNOWN:
                    self._known.clear()
                self._known[text] = n
            return n


class HfAdapter:
    """What the transformers adapters share: their source and options, offline loading,
    placement on the device, how their processor sizes a frame, and unloading."""

    takes_prompt = False
    uses_context = False
    input_size: tuple[int, int] | None = None
    shape_after_load = True  # input_shape comes from the processor: the manager need not ask before

    def __init__(self, path: str, options: dict[str, Any]) -> None:
        self._source = path
        self._options = options
        self.memory_mb = 0.0
        self._model: Any = None
        self._stream: Any = None  # a CUDA stream, on a GPU

    @property
    def input_shape(self) -> InputShape | None:
        """How the loaded processor sizes a frame (None before load(), or for a processor that
        takes no images), so the decoder may DCT-scale large JPEGs towards it."""
        processor = getattr(self, "_processor", None)
        return None if processor is None else shape_of(getattr(processor, "image_processor", processor))

    def prompt_problem(self, text: str) -> str | None:
        """Why the loaded model cannot read this prompt (longer than its text encoder takes),
        or None. Safe from any thread; the control plane asks before taking a prompt."""
        return None

    def source(self) -> str:
        """The local folder to load from (after switching the hub off)."""
        offline()
        return local_source(self._source)

    def placed(self, model: Any, device: str) -> None:
        self._model = place(model, device, self._options)
        self.memory_mb = memory_mb(self._model)
        self._stream = None
        if device.startswith("cuda"):
            import torch

            self._stream = torch.cuda.Stream(device)  # this worker's own: copies and kernels in order

    def host_inputs(self, tensors: Any, images: list[Any], **extra: Any) -> Inputs:
        """Wrap a processor's output for `infer`, pinned for asynchronous copies on a GPU."""
        import torch

        pinned = dict(tensors)
        if self._stream is not None:
            pinned = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in pinned.items()}
        return Inputs(pinned, [img.shape[:2] for img in images], extra)

    def on_device(self, inputs: Inputs, call: Callable[[dict[str, Any]], Any]) -> Any:
        """`call(tensors on the device)`, its outputs back on the host: the device thread's part."""
        import torch

        with torch.inference_mode():
            if self._stream is None:
                return to_host(call(to_device(inputs.tensors, self._model)))
            with torch.cuda.stream(self._stream):
                outputs = to_host(call(to_device(inputs.tensors, self._model, non_blocking=True)))
            self._stream.synchronize()
            return outputs

    def unload(self) -> None:
        self._model = None
        self._stream = None


class ImageToText(HfAdapter):
    """A captioning or question-answering model (`task`: caption | vqa) that generates text:
    options `task`, `max_new_tokens` (64) and, for chat VLMs, `caption_question` (what a
    caption asks when the prompt is empty)."""

    takes_prompt = True
    check_prompt = staticmethod(check_question)

    def __init__(self, path: str, options: dict[str, Any]) -> None:
        super().__init__(path, options)
        self.task = str(options.get("task", "caption"))
        self.max_new_tokens = int(options.get("max_new_tokens", 64))
        self.caption_question = str(options.get("caption_question", "Describe this image in one sentence."))

    def question(self, prompt: Any) -> str:
        """The prompt's question, or the caption question. Raises ModelError for a vqa model
        without one."""
        text = prompt.text.strip() if prompt else ""
        if self.task == "vqa" and not text:
            raise ModelError("a vqa model needs a question: set the pipeline's prompt")
        return text or self.caption_question


class ImageModel(HfAdapter):
    """A staged model whose processor takes images alone and whose forward takes all the
    processor's tensors (detection, depth, classification): subclasses name their transformers
    auto class and write `finish`."""

    auto_class: str  # e.g. "AutoModelForObjectDetection"
    _processor: Any

    def load(self, device: str) -> None:
        source = self.source()
        import transformers

        self._processor = transformers.AutoImageProcessor.from_pretrained(source)
        self.placed(getattr(transformers, self.auto_class).from_pretrained(source), device)

    def prepare(self, images: list[Any], prompt: Any = None, contexts: Any = None) -> Inputs:
        try:
            tensors = self._processor(images=images, return_tensors="pt", input_data_format=CHANNELS_LAST)
        except ValueError as e:  # e.g. an image so thin that its resize rounds a side to 0
            sizes = ", ".join(f"{img.shape[1]}x{img.shape[0]}" for img in images)
            raise ModelError(f"the model's image processor cannot take this image ({sizes}): {e}") from e
        return self.host_inputs(tensors, images)

    def infer(self, inputs: Inputs) -> Any:
        return self.on_device(inputs, lambda tensors: self._model(**tensors))
