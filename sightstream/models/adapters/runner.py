"""What the ONNX and torch adapters (YOLO detection, segmentation, classification) ask of the
model they run: OnnxModel (onnx_common) and TorchModel (torch_common) both answer it. And
what both runners do alike: run a batch image by image when the file fixes the batch size,
pad a partial batch up to a bucket size, and try the model once at load."""

from __future__ import annotations

import ast
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from sightstream.errors import ModelError


class Runner(Protocol):
    inputs: list[str]  # input names (ONNX); the torch runner takes one unnamed input
    outputs: list[str]  # output names, in the order run() returns them
    metadata: dict[str, Any]  # the export's own (ONNX custom metadata, Ultralytics' config.txt)
    input_dims: list[Any] | None  # the first input's shape, where the file tells it

    def host_buffer(self, shape: tuple[int, ...]) -> np.ndarray: ...
    def run(self, batch: np.ndarray, input_name: str | None = None) -> list[np.ndarray]: ...


def run_batched(call: Callable[[np.ndarray], list[np.ndarray]], batch: np.ndarray,
                fixed_batch: int | None, buckets: tuple[int, ...]) -> list[np.ndarray]:
    """`call`'s outputs for `batch`, one row per image: image by image when the model's batch
    size is fixed to another, else padded up to the next of `buckets` (so a GPU sees few
    shapes and reuses their plans) and the padding's rows dropped."""
    n = len(batch)
    if fixed_batch is not None and fixed_batch != n:
        parts = [call(batch[i : i + 1]) for i in range(n)]
        return [np.concatenate(outs, axis=0) for outs in zip(*parts)]
    size = next((b for b in buckets if b >= n), n)
    if size != n:
        padded = np.zeros((size, *batch.shape[1:]), dtype=batch.dtype)
        padded[:n] = batch
        return [out[:n] for out in call(padded)]
    return call(batch)


def class_names(names: Any) -> list[str]:
    """Class names in id order from an export's `names` metadata: a dict literal (ONNX
    metadata), a dict with string keys (Ultralytics' config.txt), or a list. Raises ValueError,
    SyntaxError or TypeError when it is none of these."""
    if isinstance(names, str):
        names = ast.literal_eval(names)
    if isinstance(names, dict):
        return [str(names[k]) for k in sorted(names, key=int)]
    return [str(n) for n in names]


def warm_up(runner: Runner, width: int, height: int) -> None:
    """One call on a blank image at load: a file that cannot run here (made for another device
    or dtype, or a wrong input size) fails once, with its reason, not on every batch. The
    call also tells the outputs' names of a torch file."""
    batch = runner.host_buffer((1, 3, height, width))
    batch.fill(0)
    try:
        runner.run(batch)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - the framework's own error, whatever its type
        raise ModelError(f"the model fails on a {width}x{height} input: {e}") from None


class OnFile:
    """What the adapters of an ONNX or torch file share (YOLO, segmentation, classification):
    opening the file on a device with the runner of their backend (ONNX Runtime; the torch
    backend's classes set `on_torch`), trying a torch file once at load, and the memory the
    runner reports to the manager."""

    on_torch = False
    _path: str | bytes
    _options: dict[str, Any]
    _model: Runner | None

    def _open(self, device: str, width: int | None = None, height: int | None = None) -> Runner:
        """The runner, tried once on a width x height input when it runs a torch file (given
        the size: a YOLO export tells its own, from the opened file)."""
        if not self.on_torch:
            from sightstream.models.adapters.onnx_common import OnnxModel

            return OnnxModel(self._path, device, self._options)
        from sightstream.models.adapters.torch_common import TorchModel

        runner = TorchModel(self._path, device, self._options)
        if width and height:
            warm_up(runner, width, height)
        return runner

    def _open_fixed(self, device: str, size: tuple[int, int]) -> tuple[Runner, tuple[int, int]]:
        """The runner and its input's (width, height): the file's own where its input is fixed
        ([batch, 3, h, w] with numbers) and the options set no `input_size`, else `size`. A fixed
        input that `input_size` contradicts is refused, saying both."""
        runner = self._open(device)
        dims = runner.input_dims or []
        fixed = (dims[3], dims[2]) if len(dims) == 4 and all(isinstance(d, int) for d in dims[2:]) else None
        if fixed is not None and fixed != size:
            if "input_size" in self._options:
                raise ModelError(f"the model's input is fixed at {fixed[0]}x{fixed[1]}, but its entry's "
                                 f"input_size is {size[0]}x{size[1]}: set input_size = "
                                 f"[{fixed[0]}, {fixed[1]}]")
            size = fixed
        if self.on_torch:
            warm_up(runner, *size)
        return runner, size

    @property
    def memory_mb(self) -> float:
        """What the runner tells (a torch model's parameters); 0: the manager estimates it."""
        return float(getattr(self._model, "memory_mb", 0.0))
