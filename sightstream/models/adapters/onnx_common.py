"""What every ONNX Runtime adapter shares: sessions placed on a device, letterboxing, NMS."""

from __future__ import annotations

import numpy as np
from PIL import Image

from sightstream.errors import ModelError


def providers_for(device: str) -> list:
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    if not device.startswith("cuda:"):
        raise ModelError(f"unknown device {device!r}: use cpu or cuda:N")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ModelError(
            f"device {device} needs onnxruntime-gpu: pip install 'sightstream[gpu]' "
            "(it replaces the CPU onnxruntime)"
        )
    return [("CUDAExecutionProvider", {"device_id": int(device.split(":")[1])}), "CPUExecutionProvider"]


def make_session(model: str | bytes, device: str):  # -> onnxruntime.InferenceSession
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: ORT's warnings are not the user's business
    try:
        return ort.InferenceSession(model, sess_options=opts, providers=providers_for(device))
    except ModelError:
        raise
    except Exception as e:  # ORT raises its own untyped errors for bad files
        raise ModelError(f"ONNX Runtime cannot load the model: {e}") from e


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


def run_batched(session, input_name: str, batch: np.ndarray) -> list[np.ndarray]:
    """Run a batch; models exported with a fixed batch of 1 are run image by image."""
    dim = session.get_inputs()[0].shape[0]
    if isinstance(dim, int) and dim != len(batch):
        parts = [session.run(None, {input_name: batch[i : i + 1]}) for i in range(len(batch))]
        return [np.concatenate(outs, axis=0) for outs in zip(*parts)]
    return session.run(None, {input_name: batch})
