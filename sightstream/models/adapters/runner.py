"""What the ONNX and torch adapters (YOLO detection, segmentation, classification) ask of the
model they run: OnnxModel (onnx_common) and TorchModel (torch_common) both answer it."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class Runner(Protocol):
    inputs: list[str]  # input names (ONNX); the torch runner takes one unnamed input
    outputs: list[str]  # output names, in the order run() returns them
    metadata: dict[str, Any]  # the export's own (ONNX custom metadata, Ultralytics' config.txt)
    input_dims: list[Any] | None  # the first input's shape, where the file tells it

    def host_buffer(self, shape: tuple[int, ...]) -> np.ndarray: ...
    def run(self, batch: np.ndarray, input_name: str | None = None) -> list[np.ndarray]: ...
