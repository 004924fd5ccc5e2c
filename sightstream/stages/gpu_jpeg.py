"""JPEG decoding on a GPU (nvJPEG, through torchvision), for hosts where CPU decoding is the
wall (a 1920x1080 JPEG costs ~5 ms of a CPU core). Chosen by `decode.device = "cuda:N"`;
the decoded pixels come back to host memory, so adapters see the same arrays as with CPU
decoding. Other formats, raw frames and JPEGs nvJPEG refuses are decoded on the CPU."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from sightstream.errors import ConfigError

JpegBatchDecoder = Callable[[list[bytes]], list[np.ndarray]]


def nvjpeg_decoder(device: str) -> JpegBatchDecoder:
    """A function decoding a list of JPEGs on `device` to RGB HxWx3 uint8 host arrays.
    Raises ConfigError when this host cannot (no torchvision, no CUDA)."""
    try:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        raise ConfigError(
            f"invalid setting decode.device = {device!r}: GPU JPEG decoding needs torchvision "
            "built for this torch (pip install torchvision matching your torch); or set it to \"cpu\""
        ) from None
    if not torch.cuda.is_available():
        raise ConfigError(f"invalid setting decode.device = {device!r}: torch sees no CUDA GPU here")

    one_at_a_time = threading.Lock()  # decode threads share one nvJPEG state per device

    def decode(jpegs: list[bytes]) -> list[np.ndarray]:
        tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]
        with one_at_a_time:
            images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
            return [image.permute(1, 2, 0).cpu().numpy() for image in images]

    return decode
