"""A TorchScript or torch.export model on one device, run a batch at a time: the `torch`
backend's runner, used by the same adapters as ONNX Runtime's (YOLO detection, semantic
segmentation, classification).

- A file saved by `torch.jit.save` (what `torch.jit.trace`/`script` make, and Ultralytics'
  `format="torchscript"` export) is loaded with `torch.jit.load`; `torch.export.save`'s
  `.pt2` files with `torch.export.load`. Either way no Python code of the model's is needed.
- An Ultralytics export's `config.txt` (input size and class names) is read as metadata; a
  torch.export program tells its input's shape, and a fixed batch size is run image by image.
- On a GPU: the input is filled in pinned host memory and copied without blocking on a CUDA
  stream of the model's own; partial batches are padded up to a few bucket sizes (as ONNX
  models are); outputs come back to host memory (NMS and encoding run on the CPU). `dtype`
  ("float32" by default; "float16" or "bfloat16") casts a TorchScript model and its input.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from sightstream.errors import ModelError
from sightstream.models.adapters.hf_common import memory_mb, torch_device, torch_dtype
from sightstream.models.adapters.onnx_common import GPU_BUCKETS
from sightstream.models.adapters.runner import run_batched

# Deprecated in torch 2.13, and still what users' files are: its warning is not theirs to fix.
# Set once for the process: warnings.catch_warnings() is not safe in the device threads.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=DeprecationWarning)


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
        self.inputs = ["input"]  # one tensor, passed by position
        self.outputs: list[str] = ["output0"]  # the outputs' names, known after the first call
        self.input_dims: list[Any] | None = None  # known for a torch.export program
        self.module = self._load(path)
        self.memory_mb = memory_mb(self.module)
        dims: list[Any] = self.input_dims or []
        self.fixed_batch = dims[0] if dims and isinstance(dims[0], int) else None
        on_gpu = self.device.type == "cuda"
        buckets = options.get("batch_buckets", GPU_BUCKETS if on_gpu else ())
        self.buckets = tuple(sorted(int(b) for b in buckets or ())) if self.fixed_batch is None else ()
        self._stream = torch.cuda.Stream(self.device) if on_gpu else None
        if on_gpu:
            torch.cuda.synchronize(self.device)  # weights copied and cast before another stream reads them

    def _load(self, path: str) -> Any:
        torch = self._torch
        try:
            if path.endswith(".pt2"):
                return self._exported(torch.export.load(path))
            extra = {"config.txt": ""}
            module = torch.jit.load(path, map_location="cpu", _extra_files=extra)
        except ModelError:
            raise
        except Exception as e:  # noqa: BLE001 - torch raises many kinds for a file it cannot read
            raise ModelError(f"torch cannot load {path} as a TorchScript or torch.export file (an "
                             f"Ultralytics export made with optimize=True is for mobile: export it "
                             f"without): {e}") from None
        self.metadata = _metadata(extra["config.txt"])
        module.eval()
        return module.to(self.device, dtype=self.dtype)

    def _exported(self, program: Any) -> Any:
        """A torch.export program on the device (its constants too), in the dtype it was
        exported in (its graph is fixed: inputs are cast to that; `dtype` cannot change it)."""
        torch = self._torch
        from torch.export.passes import move_to_device_pass

        placeholders = [n for n in program.graph.nodes if n.op == "placeholder"
                        and n.name in program.graph_signature.user_inputs]
        if placeholders and hasattr(placeholders[0].meta.get("val"), "shape"):
            self.input_dims = [d if isinstance(d, int) else None for d in placeholders[0].meta["val"].shape]
        if self.device.type != "cpu":
            program = move_to_device_pass(program, self.device)
        module = program.module()
        floats = [t.dtype for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
        exported = floats[0] if floats else torch.float32
        if self.dtype not in (torch.float32, exported):
            raise ModelError(f"a torch.export program runs in the dtype it was exported in ({exported}); "
                             "export it in the one you want instead of setting dtype")
        self.dtype = exported
        return module

    def host_buffer(self, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 input buffer for `prepare` to fill: pinned on a GPU, so the copy is a DMA."""
        pinned = self._stream is not None
        return self._torch.empty(shape, dtype=self._torch.float32, pin_memory=pinned).numpy()

    def run(self, batch: np.ndarray, input_name: str | None = None) -> list[np.ndarray]:
        """The model's outputs for a batch, as host arrays in order: a tensor, or each tensor of
        a tuple, list or dict it returns (`outputs` names them: dict keys, else output0, …)."""
        return run_batched(self._call, batch, self.fixed_batch, self.buckets)

    def _call(self, batch: np.ndarray) -> list[np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            if self._stream is None:
                return self._to_host(self.module(torch.from_numpy(batch).to(self.dtype)))
            with torch.cuda.stream(self._stream):
                pixels = torch.from_numpy(batch).to(self.device, non_blocking=True).to(self.dtype)
                outputs = self.module(pixels)
            self._stream.synchronize()
            return self._to_host(outputs)

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
