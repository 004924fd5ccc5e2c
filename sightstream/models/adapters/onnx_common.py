"""What every ONNX Runtime adapter shares: sessions placed on a device and run in batches,
letterboxing, NMS."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from sightstream import log
from sightstream.errors import ModelError
from sightstream.models.adapters.runner import run_batched

_log = log.get(__name__)

# On a GPU: cuDNN picks each convolution's fastest algorithm once per input shape (batch buckets
# keep the shapes few), and the memory arena grows by what is asked, not by doubling, so a
# device holds several models. `cuda_options` in a model's entry overrides these.
CUDA_DEFAULTS = {"cudnn_conv_algo_search": "EXHAUSTIVE", "arena_extend_strategy": "kSameAsRequested",
                 "do_copy_in_default_stream": True}
# Partial batches on a GPU are padded up to one of these sizes (`batch_buckets` option).
GPU_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def providers_for(device: str, cuda_options: dict[str, Any] | None = None) -> list:
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    if not device.startswith("cuda:"):
        raise ModelError(f"unknown device {device!r}: use cpu or cuda:N")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        # The GPU was found through torch: its torch models use it, and ONNX models still run
        # (on the CPU) rather than fail every frame.
        _log.warning("onnx_model_on_cpu", device=device, advice="the CPU onnxruntime is installed; "
                     "for ONNX models on the GPU: pip install 'sightstream[gpu]'")
        return ["CPUExecutionProvider"]
    options = {**CUDA_DEFAULTS, **(cuda_options or {}), "device_id": int(device.split(":")[1])}
    return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]


def make_session(model: str | bytes, device: str, cuda_options: dict[str, Any] | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: ORT's warnings are not the user's business
    try:
        return ort.InferenceSession(model, sess_options=opts, providers=providers_for(device, cuda_options))
    except ModelError:
        raise
    except Exception as e:  # ORT raises its own untyped errors for bad files
        raise ModelError(f"ONNX Runtime cannot load the model: {e}") from e


class OnnxModel:
    """An ONNX Runtime session on one device, run a batch at a time.

    - A model exported with a fixed batch of 1 is run image by image.
    - Batch buckets (`batch_buckets` option; on GPUs by default): a partial batch is padded
      up to the next bucket size, so the device sees a few input shapes and reuses their plans.
    - I/O binding (`io_binding` option; on GPUs by default): the input is copied to the device
      once, by ONNX Runtime, and the outputs are bound to host memory.
    """

    def __init__(self, model: str | bytes, device: str, options: dict[str, Any]) -> None:
        self.session = make_session(model, device, options.get("cuda_options"))
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.input_dims: list[Any] | None = list(self.session.get_inputs()[0].shape)
        self.metadata: dict[str, Any] = dict(self.session.get_modelmeta().custom_metadata_map)
        on_gpu = device.startswith("cuda:")
        dim = self.session.get_inputs()[0].shape[0]
        self.fixed_batch = dim if isinstance(dim, int) else None
        buckets = options.get("batch_buckets", GPU_BUCKETS if on_gpu else ())
        self.buckets = tuple(sorted(int(b) for b in buckets or ())) if self.fixed_batch is None else ()
        self.io_binding = bool(options.get("io_binding", on_gpu))
        self._device = device
        self._pinned = on_gpu and _torch_cuda()

    def host_buffer(self, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 input buffer for `prepare` to fill: in pinned (page-locked) memory on a GPU
        when a CUDA build of torch can allocate it, so the copy to the device is a DMA."""
        if self._pinned:
            import torch

            return torch.empty(shape, dtype=torch.float32, pin_memory=True).numpy()
        return np.empty(shape, dtype=np.float32)

    def run(self, batch: np.ndarray, input_name: str | None = None) -> list[np.ndarray]:
        """The model's outputs (in `self.outputs` order) for a batch, one row per image."""
        name = input_name or self.inputs[0]
        return run_batched(lambda b: self._run(name, b), batch, self.fixed_batch, self.buckets)

    def _run(self, name: str, batch: np.ndarray) -> list[np.ndarray]:
        if not self.io_binding:
            return self.session.run(None, {name: batch})
        binding = self.session.io_binding()
        binding.bind_cpu_input(name, np.ascontiguousarray(batch))
        for output in self.outputs:
            binding.bind_output(output)  # host memory: NMS and encoding run on the CPU
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()


def _torch_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def letterbox(
    image: np.ndarray, size: tuple[int, int], pad: int = 114, center: bool = True
) -> tuple[np.ndarray, float, tuple[float, float]]:
    """Resize keeping the aspect ratio into a (width, height) canvas.

    Returns the canvas (HxWx3 uint8), the scale applied, and the (x, y) offset of the image in
    the canvas: a canvas point p maps back to (p - offset) / scale in the original image."""
    w, h = size
    ih, iw = image.shape[:2]
    scale = min(w / iw, h / ih)
    nw, nh = max(1, round(iw * scale)), max(1, round(ih * scale))
    if (nw, nh) != (iw, ih):
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR))
    canvas = np.full((h, w, 3), pad, dtype=np.uint8)
    dx, dy = ((w - nw) // 2, (h - nh) // 2) if center else (0, 0)
    canvas[dy : dy + nh, dx : dx + nw] = image
    return canvas, scale, (float(dx), float(dy))


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression on xyxy boxes; returns kept indices, best first."""
    if len(boxes) == 0:
        return np.empty(0, dtype=np.int64)
    x1, y1, x2, y2 = boxes.T
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    order = scores.argsort()[::-1]
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        iw = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        ih = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = iw * ih
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-9)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float) -> np.ndarray:
    """Class-aware NMS: boxes of different classes never suppress each other."""
    if len(boxes) == 0:
        return np.empty(0, dtype=np.int64)
    offset = classes[:, None].astype(np.float32) * (boxes.max() + 1.0)
    return nms(boxes + offset, scores, iou)
