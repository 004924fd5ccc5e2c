"""Mask encodings for segmentation results: COCO RLE (the compressed string pycocotools
writes, so `pycocotools.mask.decode` reads it), PNG, and packbits."""

from __future__ import annotations

import base64
import io
import struct

import numpy as np
from PIL import Image


def rle_counts(mask: np.ndarray) -> list[int]:
    """Run lengths of a boolean HxW mask in column-major order, starting with a run of 0s."""
    flat = mask.flatten(order="F").astype(np.uint8)
    if flat.size == 0:
        return []
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return [0, *runs] if flat[0] else runs


def rle_encode(mask: np.ndarray) -> dict:
    """COCO RLE: {"size": [h, w], "counts": compressed string} (pycocotools' rleToString)."""
    counts = rle_counts(mask)
    chars = []
    for i, value in enumerate(counts):
        x = value - counts[i - 2] if i > 2 else value
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            chars.append(chr(c + 48))
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": "".join(chars)}


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def packbits(mask: np.ndarray) -> str:
    """Row-major bits of a boolean mask, packed 8 to a byte (numpy.packbits), base64."""
    return base64.b64encode(np.packbits(mask.astype(bool), axis=None).tobytes()).decode()


def rle_decode(rle: dict) -> np.ndarray:
    """A boolean HxW mask from COCO RLE (the compressed string `rle_encode` writes)."""
    height, width = rle["size"]
    text: str = rle["counts"]
    counts: list[int] = []
    p = 0
    while p < len(text):
        x, shift, more = 0, 0, True
        while more:
            c = ord(text[p]) - 48
            x |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            p += 1
            shift += 5
            if not more and c & 0x10:
                x |= -1 << shift
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    flat = np.zeros(height * width, dtype=bool)
    pos, value = 0, False
    for run in counts:
        flat[pos:pos + run] = value
        pos += run
        value = not value
    return flat.reshape((width, height)).T


def packbits_frame(mask: np.ndarray) -> bytes:
    """A mask as one binary block: big-endian uint32 height, width and row stride (bytes per
    row), then each row's bits packed 8 to a byte, most significant bit first."""
    height, width = mask.shape
    rows = np.packbits(mask.astype(bool), axis=1)
    return struct.pack(">III", height, width, rows.shape[1] if height else (width + 7) // 8) + rows.tobytes()
