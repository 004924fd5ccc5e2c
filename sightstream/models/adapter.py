"""The one protocol every model family implements. Pre- and post-processing live inside the
adapter; the pipeline knows nothing of frameworks. Heavy imports happen in load().

An adapter is either whole or staged:
- whole: `infer(images, prompt[, contexts])` returns one Prediction per image. The worker runs
  the call on its device thread. The least a plug-in has to write.
- staged: it also has `prepare` and `finish`, and its `infer` takes what `prepare` returned.
  `prepare` (letterbox, normalise, pack into one buffer) and `finish` (NMS, masks, encoding,
  mapping back to the image's pixels) run in the CPU pool, and the device thread runs only
  `infer`, so while one batch is on the device the next is being prepared and the one before
  finished. `predict()` runs either kind in one call, in the caller's thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, TypeGuard

import numpy as np

from sightstream.errors import ModelError
from sightstream.frames import Prediction
from sightstream.models.input_shape import InputShape
from sightstream.prompts import Prompt


@dataclass(frozen=True, slots=True)
class FrameContext:
    """What a model may need to know of an image beyond its pixels. Given to adapters that set
    `uses_context`: stateful models (tracking) keep their state per source, and models in a
    chained pipeline are prompted by an upstream pipeline's detections."""

    source: str
    ts_ms: int
    detections: list[dict[str, Any]] | None = None  # boxes in this image's pixels
    # Changes when this daemon takes the source again after another had it: state kept per
    # source must then start afresh (it missed frames).
    generation: int = 0


# A text model's call: a 4096-token summary window through a 0.5B model takes ~1.5 min on two
# CPU cores, four windows to a call several minutes.
TEXT_TIMEOUT_S = 600.0


class Adapter(Protocol):
    task: str  # detect | segment | depth | caption | vqa | track | classify | generate
    takes_prompt: bool
    # True: infer() gets a third argument, `contexts`, one FrameContext per image; such a
    # model may serve a chained pipeline (`prompt_from`).
    uses_context: bool
    # The model's input (width, height), when it letterboxes frames to a fixed one: the decoder
    # may then decode a detector's large JPEGs at a reduced scale. None: decode at full size.
    # An adapter whose preprocessing sizes frames another way (or a model of another task)
    # says so with an optional `input_shape` (an InputShape, or None until it knows: see
    # input_shape() below).
    input_size: tuple[int, int] | None
    # Optional `call_timeout_s`: the least time one call must be given, where the daemon's
    # inference_timeout_s would be too short for this model. Text models (task generate) get
    # TEXT_TIMEOUT_S without it; a config entry's `timeout_s` overrides both (manager.timeout_s).

    def __init__(self, path: str | bytes, options: dict[str, Any]) -> None: ...
    def load(self, device: str) -> None: ...
    def infer(self, images: list[np.ndarray], prompt: Prompt | None) -> list[Prediction]: ...
    def unload(self) -> None: ...


class Staged(Protocol):
    """The three steps of a staged adapter (beside Adapter's attributes, load and unload)."""

    def prepare(
        self, images: list[np.ndarray], prompt: Prompt | None, contexts: list[FrameContext] | None
    ) -> Any: ...
    def infer(self, prepared: Any) -> Any: ...
    def finish(self, prepared: Any, outputs: Any) -> list[Prediction]: ...


def bounded(name: str, value: float, low: float, high: float = float("inf")) -> Any:
    """An option's value if within [low, high], else ModelError naming the option: a threshold
    of 1.5 or an input_size of 0 would run and quietly find nothing."""
    if not low <= value <= high:
        span = f"at least {low:g}" if high == float("inf") else f"from {low:g} to {high:g}"
        raise ModelError(f"{name} must be {span}, not {value:g}")
    return value


def label_list(options: dict[str, Any]) -> list[str]:
    """The entry's `labels` option: a list of class names, else ModelError. A string was read
    as its characters ("a,b": three classes, `a`, `,` and `b`)."""
    labels = options.get("labels", [])
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise ModelError(f'labels must be a list of class names, e.g. ["person", "car"], not {labels!r}')
    return list(labels)


def input_shape(adapter: Adapter) -> InputShape | None:
    """How the adapter sizes a frame: its `input_shape` when it has one, else (a detector) a
    letterbox to its `input_size`, else None (unknown: JPEGs are decoded at full size). A
    classifier's or captioner's `input_size` says nothing of how it gets there (a crop keeps
    fewer pixels than a letterbox): such a plug-in sets `input_shape`."""
    shape = getattr(adapter, "input_shape", None)
    if shape is None and adapter.input_size and adapter.task == "detect":
        shape = InputShape.fit(*adapter.input_size)
    return shape


def is_staged(adapter: object) -> TypeGuard[Staged]:
    return callable(getattr(adapter, "prepare", None)) and callable(getattr(adapter, "finish", None))


def predict(
    adapter: Any, images: list[np.ndarray], prompt: Prompt | None = None,
    contexts: list[FrameContext] | None = None,
) -> list[Prediction]:
    """One call through a whole or staged adapter, in this thread (benchmarks, tests, tools)."""
    if is_staged(adapter):
        prepared = adapter.prepare(images, prompt, contexts)
        return adapter.finish(prepared, adapter.infer(prepared))
    if adapter.uses_context:
        return adapter.infer(images, prompt, contexts)
    return adapter.infer(images, prompt)
