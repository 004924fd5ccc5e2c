"""A decoded video frame as RGB pixels the way players show it. Phones record portrait video
as landscape pictures plus a display matrix that says to turn them (a quarter turn, usually);
some front cameras' also says to mirror them. FFmpeg's own command and players obey it: a
model must see what a viewer sees.

The matrix is read as FFmpeg's command reads it (fftools' autorotate): its rotation, then the
signs of its entries for the flips. PyAV's `rotation` alone reads a mirroring as a half turn,
which turned a mirrored video upside down. Angles other than quarter turns are left as stored."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

IDENTITY = (1 << 16, 0, 0, 0, 1 << 16, 0, 0, 0, 1 << 30)


def upright_rgb(frame: Any) -> np.ndarray:
    """`frame` (a PyAV VideoFrame) as height x width x 3 RGB, turned and mirrored as its
    display matrix says."""
    image = frame.to_ndarray(format="rgb24")
    shown = displayed(image, frame.rotation or 0, display_matrix(frame))
    return shown if shown is image else np.ascontiguousarray(shown)


def display_matrix(frame: Any) -> tuple[int, ...]:
    """The frame's display matrix (9 int32: 16.16 fixed point, the last column 2.30)."""
    for data in frame.side_data:
        if getattr(data.type, "name", "") == "DISPLAYMATRIX":
            return tuple(int(v) for v in np.frombuffer(bytes(data), np.int32))
    return IDENTITY


def displayed(image: np.ndarray, rotation: float, m: tuple[int, ...]) -> np.ndarray:
    """`image` as shown. `rotation`: PyAV's, degrees counterclockwise (av_display_rotation_get)."""
    clockwise = -rotation
    clockwise -= 360 * math.floor(clockwise / 360 + 0.9 / 360)
    if abs(clockwise - 90) < 1:
        return image.swapaxes(0, 1) if m[3] > 0 else np.rot90(image, -1)  # transpose; or a turn
    if abs(clockwise - 270) < 1:
        return image[::-1, ::-1].swapaxes(0, 1) if m[3] < 0 else np.rot90(image, 1)
    if abs(clockwise - 180) < 1:  # a half turn is both flips; a mirroring reads as one too
        if m[0] < 0:
            image = image[:, ::-1]
        if m[4] < 0:
            image = image[::-1]
        return image
    if abs(clockwise) < 1 and m[4] < 0:
        return image[::-1]
    return image
