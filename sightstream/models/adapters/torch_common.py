"""A TorchScript or torch.export model on one device, run a batch at a time: the `torch`
backend's runner, used by the same adapters as ONNX Runtime's (YOLO detection, semantic
segmentation, classification).

- A file saved by `torch.jit.save` (what `torch.jit.trace`/`script` make, and Ultralytics'
  `format="torchscript"` export) is loaded with `torch.jit.load`; `torch.export.save`'s
  `.pt2` files with `torch.export.load`. Either way no Python code of the model's is needed.
- An Ultralytics export's `config.txt` (input size and class names) is read as metadata.
- On a GPU: the input is filled in pinned host memory and copied without blocking on a CUDA
  stream of the worker's own; outputs come back to host memory (NMS and encoding run on the
  CPU). `dtype` ("float32" by default; "float16" or "bfloat16") casts the model and its input.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from sightstream.errors import ModelError
from sightstream.models.adapters.hf_common import memory_mb, torch_device, torch_dtype


class TorchModel:
    def __init__(self, path: str | bytes, device: str, options: dict[str, Any]) -> None:
        import torch

        if not isinstance(path, str) or not Path(path).is_file():
            raise ModelError(f"{path!r} is not a file: the torch backend loads a TorchScript "
                             "(torch.jit.save) or torch.export (.pt2) file")
        self._torch = torch
        self.device = torch_device(device)
        self.dtype = torch_dtype(str(options.get("dtype", "float32")))
        self.metadata: dict[str, Any] = {}
        self.module = self._load(path)
        self.memory_mb = memory_mb(self.module)
        self.inputs = ["input"]  # one tensor, passed by position
        self.outputs: list[str] = ["output0"]  # the outputs' names, known after the first call
        self.input_dims: list[Any] | None = None  # a TorchScript file does not tell it
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def _load(self, path: str) -> Any:
        torch = self._torch
        try:
            if path.endswith(".pt2"):
                return self._exported(torch.export.load(path).module())
            extra = {"config.txt": ""}
            with warnings.catch_warnings():  # deprecated in torch 2.13; the user's file is what it is
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(path, map_location="cpu", _extra_files=extra)
        except ModelError:
            raise
        except Exception as e:  # noqa: BLE001 - torch raises many kinds for a file it cannot read
            raise ModelError(f"torch cannot load {path} as a TorchScript or torch.export file: {e}") from None
        self.metadata = _metadata(extra["config.txt"])
        module.eval()
        return module.to(self.device, dtype=self.dtype)

    def _exported(self, module: Any) -> Any:
        """A torch.export program runs in the dtype it was exported in (its graph is fixed):
        inputs are cast to that; `dtype` cannot change it."""
        torch = self._torch
        floats = [t.dtype for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
        exported = floats[0] if floats else torch.float32
        if self.dtype != torch.float32 and self.dtype != exported:
            raise ModelError(f"a torch.export program runs in the dtype it was exported in ({exported}); "
                             "export it in the one you want instead of setting dtype")
        self.dtype = exported
        return module.to(self.device)

    def host_buffer(self, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 input buffer for `prepare` to fill: pinned on a GPU, so the copy is a DMA."""
        pinned = self._stream is not None
        return self._torch.empty(shape, dtype=self._torch.float32, pin_memory=pinned).numpy()

    def run(self, batch: np.ndarray, input_name: str | None = None) -> list[np.ndarray]:
        """The model's outputs for a batch, as host arrays in order: a tensor, or each tensor of
        a tuple, list or dict it returns (`outputs` names them: dict keys, else output0, …)."""
        torch = self._torch
        with torch.inference_mode():
            if self._stream is None:
                outputs = self.module(torch.from_numpy(batch).to(self.dtype))
                return self._to_host(outputs)
            with torch.cuda.stream(self._stream):
                pixels = torch.from_numpy(batch).to(self.device, non_blocking=True).to(self.dtype)
                host = self._to_host(self.module(pixels))
            self._stream.synchronize()
            return host

    def _to_host(self, outputs: Any) -> list[np.ndarray]:
        if isinstance(outputs, dict):
            names, values = list(outputs), list(outputs.values())
        elif isinstance(outputs, (tuple, list)):
            names, values = [f"output{i}" for i in range(len(outputs))], list(outputs)
        else:
            names, values = ["output0"], [outputs]
        if not all(isinstance(v, self._torch.Tensor) for v in values):
            raise ModelError("the model returned something other than tensors (a tensor, or a tuple, "
                             "list or dict of them)")
        self.outputs = names
        # numpy has no bfloat16 (nor need of float16 downstream): floats come back as float32
        return [(v.float() if v.is_floating_point() else v).detach().cpu().numpy() for v in values]


def _metadata(text: str | bytes) -> dict[str, Any]:
    """Ultralytics writes its export's metadata (imgsz, names, …) as JSON in config.txt."""
    try:
        found = json.loads(text) if text else {}
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}
