"""Which devices the workers own: `devices = "auto"` means every GPU that torch (a CUDA build)
or ONNX Runtime (onnxruntime-gpu) can use, else the CPU.

CUDA numbers the GPUs a process may use 0, 1, … in the order CUDA_VISIBLE_DEVICES lists them
(indexes or UUIDs), while nvidia-smi and NVML list every GPU of the host. `cuda_order` maps the
one onto the other, so `auto` makes workers for each visible GPU and the GPU gauges of `cuda:N`
read the GPU that CUDA calls N.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from functools import partial
from pathlib import Path
from typing import Any, Literal, NamedTuple

from sightstream.errors import ConfigError, SightstreamError
from sightstream.metrics import Metrics


def resolve(devices: str | list[str]) -> list[str]:
    """The workers' devices. A `cuda:N` named in the config must be a GPU this process can use
    (ConfigError): on a host without one, its worker ran on the CPU under the GPU's name."""
    if devices == "auto":
        return [f"cuda:{i}" for i in range(_visible_gpus().visible)] or ["cpu"]
    wanted = [int(d.split(":", 1)[1]) for d in devices if d.startswith("cuda:")]
    if wanted:
        gpus = _visible_gpus()
        if gpus.smi in ("missing", "failed") and _torch_has_cuda():
            gpus = _torch_gpus()  # a host without nvidia-smi (Jetson): torch counts them
        if (missing := [n for n in wanted if n >= gpus.visible]):
            message = f"cuda:{missing[0]} is not a GPU this process can use: {gpus.why}"
            if gpus.smi == "failed":  # the driver not ready yet: a restart may do
                raise SightstreamError(f"devices: {message}")
            raise ConfigError(f"invalid setting devices: {message}")
    return list(devices)


class Gpus(NamedTuple):
    visible: int  # GPUs CUDA numbers for this process
    why: str  # in words: how many, and why not more
    smi: Literal["ran", "missing", "failed", "not asked"]  # what nvidia-smi -L did


def _torch_gpus() -> Gpus:
    import torch  # seconds: only when the config names a GPU and nvidia-smi cannot tell

    count = torch.cuda.device_count()
    return Gpus(count, f"{count} visible to torch", "not asked")


def _visible_gpus() -> Gpus:
    """The GPUs CUDA will number, when a CUDA build of torch or onnxruntime-gpu can use them."""
    if not (_torch_has_cuda() or _onnxruntime_has_cuda()):
        return Gpus(0, "neither a CUDA build of torch nor onnxruntime-gpu is installed "
                       "(pip install 'sightstream[gpu]' on a GPU host)", "not asked")
    smi = shutil.which("nvidia-smi")
    if not smi:
        return Gpus(0, "nvidia-smi is not on PATH (no NVIDIA driver on this host?)", "missing")
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return Gpus(0, f"nvidia-smi -L failed ({e})", "failed")
    uuids = [m.group(1) if (m := re.search(r"\(UUID: ([^)]+)\)", line)) else ""
             for line in out.splitlines() if line.startswith("GPU ")]
    count = len(cuda_order(uuids))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
    return Gpus(count, f"{count} visible{shown}", "ran")


def cuda_order(uuids: list[str], visible: str | None = None) -> list[int | None]:
    """The NVML index of each GPU CUDA numbers 0, 1, …, given every GPU's UUID in NVML's order
    and CUDA_VISIBLE_DEVICES (read from the environment when not given). As CUDA does, the list
    stops at the first entry that names no GPU (or names one twice). None: a MIG instance,
    which NVML does not index this way; a process sees one MIG instance at most, so the list
    ends there. Assumes CUDA_DEVICE_ORDER=PCI_BUS_ID (NVML's order) where GPUs of different
    models share a host."""
    if visible is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(range(len(uuids)))
    order: list[int | None] = []
    for item in (part.strip() for part in visible.split(",")):
        if item.startswith("MIG-"):
            order.append(None)
            break
        if re.fullmatch(r"\d+", item):
            index = int(item)
        else:
            found = [i for i, uuid in enumerate(uuids) if item and uuid.startswith(item)]
            index = found[0] if len(found) == 1 else -1  # an ambiguous prefix is refused too
        if not 0 <= index < len(uuids) or index in order:
            break
        order.append(index)
    return order


def _torch_has_cuda() -> bool:
    """Whether the installed torch is a CUDA build, read from its version.py: importing torch
    costs seconds and hundreds of MB, which an ONNX-only daemon should not pay."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return False
    try:
        text = (Path(spec.submodule_search_locations[0]) / "version.py").read_text()
    except OSError:
        return False
    found = re.search(r"^cuda\b[^=]*=\s*(.+)$", text, re.M)
    return found is not None and found.group(1).strip() not in ("None", "''", '""')


def _onnxruntime_has_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def memory_budgets_mb(
    devices: list[str], explicit: dict[str, float], gpu_fraction: float
) -> dict[str, float]:
    """Each device's model memory budget: the configured one, else (GPUs) a share of the free
    memory now, else none (the CPU: the operating system's memory is the limit)."""
    budgets = {d: mb for d, mb in explicit.items() if d in devices and mb > 0}
    for device in devices:
        if device.startswith("cuda:") and device not in budgets:
            free = _gpu_free_mb(int(device.split(":")[1]))
            if free:
                budgets[device] = free * gpu_fraction
    return budgets


def _gpu_free_mb(index: int) -> float:
    try:
        import torch

        if torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info(index)
            return free / 2**20
    except Exception:  # noqa: BLE001 - no torch, no driver: no automatic budget
        pass
    return 0.0


def watch_gpus(devices: list[str], metrics: Metrics) -> bool:
    """GPU utilisation and memory in use as gauges read at each scrape, through NVML
    (nvidia-ml-py) when it is installed and the devices include GPUs. False: not watched."""
    if not any(d.startswith("cuda:") for d in devices):
        return False
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        handles = nvml_handles(pynvml, devices)
    except Exception:  # noqa: BLE001 - no NVML, no driver: no GPU gauges
        return False
    for device, handle in handles.items():
        metrics.gpu_utilization.labels(device).set_function(partial(_utilisation, pynvml, handle))
        metrics.gpu_memory_used_mb.labels(device).set_function(partial(_memory_used_mb, pynvml, handle))
    return bool(handles)


def nvml_handles(nvml: Any, devices: list[str]) -> dict[str, Any]:
    """The NVML handle of each `cuda:N` device, N as CUDA numbers it (CUDA_VISIBLE_DEVICES),
    after nvmlInit(); a device NVML cannot tell (a MIG instance, past the visible ones) has none."""
    uuids = [_text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i)))
             for i in range(nvml.nvmlDeviceGetCount())]
    order = cuda_order(uuids)
    wanted = {d: int(d.split(":")[1]) for d in devices if d.startswith("cuda:")}
    return {d: nvml.nvmlDeviceGetHandleByIndex(order[k])
            for d, k in wanted.items() if k < len(order) and order[k] is not None}


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _utilisation(nvml: Any, handle: Any) -> float:
    return float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)


def _memory_used_mb(nvml: Any, handle: Any) -> float:
    return float(nvml.nvmlDeviceGetMemoryInfo(handle).used) / 2**20
