"""Which devices the workers own: `devices = "auto"` means every visible GPU that ONNX Runtime
can use, else the CPU."""

from __future__ import annotations

import shutil
import subprocess


def resolve(devices: str | list[str]) -> list[str]:
    if devices != "auto":
        return list(devices)
    return [f"cuda:{i}" for i in range(_visible_gpus())] or ["cpu"]


def _visible_gpus() -> int:
    try:
        import onnxruntime as ort
    except ImportError:
        return 0
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return 0
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))
