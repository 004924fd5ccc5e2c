"""Adapters by name. Imported lazily so `sightstream --help` never imports a framework."""

from __future__ import annotations

import importlib
from typing import Any

# adapter name -> "module:Class" under sightstream.models.adapters
ADAPTERS = {
    "yolo": "yolo:YoloDetector",
    "retinaface": "retinaface:RetinaFaceDetector",
}

# (backend, task) -> the adapter used when an entry names none
DEFAULT_ADAPTER = {
    ("onnx", "detect"): "yolo",
}


def adapter_class(name: str) -> Any:
    module, cls = ADAPTERS[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)
