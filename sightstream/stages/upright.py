"""A decoded video frame as RGB pixels the right way up. Phones record portrait video as
landscape pictures plus a display matrix that says to turn them (a quarter turn, usually),
which players and FFmpeg's own command obey: a model must see what a viewer sees. Mirroring
in the matrix (rare: some front cameras) is not applied."""

from __future__ import annotations

from typing import Any

import numpy as np


def upright_rgb(frame: Any) -> np.ndarray:
    """`frame` (a PyAV VideoFrame) as height x width x 3 RGB, turned as its display matrix says."""
    image = frame.to_ndarray(format="rgb24")
    # PyAV's rotation: degrees counterclockwise to turn the picture by, as np.rot90 turns
    turns = round((frame.rotation or 0) / 90) % 4
    return np.ascontiguousarray(np.rot90(image, turns)) if turns else image
