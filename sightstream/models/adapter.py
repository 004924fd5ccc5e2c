"""The one protocol every model family implements. Pre- and post-processing live inside the
adapter; the pipeline knows nothing of frameworks. Heavy imports happen in load()."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from sightstream.frames import Prediction


@dataclass(frozen=True, slots=True)
class Prompt:
    text: str
    version: int


class Adapter(Protocol):
    task: str  # detect | segment | depth | caption | vqa | track | classify
    takes_prompt: bool
    # The model's input (width, height), when it has a fixed one: the decoder may then decode
    # large JPEGs at a reduced scale. None: decode at full size.
    input_size: tuple[int, int] | None

    def __init__(self, path: str | bytes, options: dict[str, Any]) -> None: ...
    def load(self, device: str) -> None: ...
    def infer(self, images: list[np.ndarray], prompt: Prompt | None) -> list[Prediction]: ...
    def unload(self) -> None: ...
