"""A built-in model is given one test frame when it loads. A file that loads but is not the
model its entry says (another export, labels that do not match its outputs, an input that is
not an image) failed on every frame instead: each dead-lettered `model_error`, while `POST
/models/…/load`, the check to run before a rollout, answered 200. Failing here, its load
fails: a pipeline pauses and says why (daemon/model_pauses.py), /predict and the load say so.

Only adapters of this package that take a plain frame are tested (no prompt, no upstream
boxes, no per-source state): a plug-in's `infer` may count its calls or keep state. A file is
tested once per device and version of it (`file_version`), not at every reload.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from sightstream.errors import ModelError
from sightstream.models.adapter import predict

UNTESTED_TASKS = frozenset({"track", "generate"})
SIDE = 64  # a test frame's side when the model names no input size


def frame_for(adapter: Any) -> np.ndarray | None:
    """The frame to test `adapter` with, or None: not one this module tests."""
    if not type(adapter).__module__.startswith("sightstream.models.adapters."):
        return None
    if adapter.task in UNTESTED_TASKS or adapter.takes_prompt or adapter.uses_context:
        return None
    size = getattr(adapter, "input_size", None)
    width, height = size if isinstance(size, tuple) and len(size) == 2 else (SIDE, SIDE)
    return np.full((max(1, int(height)), max(1, int(width)), 3), 114, np.uint8)  # letterbox grey


def run(adapter: Any, frame: np.ndarray, model_id: str, device: str) -> None:
    """One call on `frame` (on the device's thread); raises ModelError saying why it failed."""
    try:
        (prediction,) = predict(adapter, [frame])
    except Exception as e:
        why = str(e) if isinstance(e, ModelError) else f"{type(e).__name__}: {e}"
        raise ModelError(f"model {model_id} loaded on {device} but fails on a test frame (is the file "
                         f"the model its entry says? its labels, its input?): {why}") from e
    if not isinstance(prediction.result, dict):
        raise ModelError(f"model {model_id} loaded on {device} but its result on a test frame is not "
                         "a JSON object")


def file_version(source: str) -> tuple[Any, ...]:
    """What changes when the weights at `source` are replaced: a file's inode, size and change
    times (a copy that keeps the modification time, `cp -p`, changes the others), or those of
    each file directly in a folder. A path that is no file here (a package's, a hub id's) is its
    own version; one that cannot be read now, none that repeats: tested again."""
    def of(stat: os.stat_result) -> tuple[int, ...]:
        return (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)

    if not source:  # no weights path (a plug-in's): not the working directory's files
        return (source,)
    try:
        path = Path(source)
        if path.is_dir():
            return tuple(sorted((e.name, *of(e.stat())) for e in os.scandir(path) if e.is_file()))
        if not path.exists():
            return (source,)
        return of(path.stat())
    except (OSError, ValueError):
        return (source, object())
