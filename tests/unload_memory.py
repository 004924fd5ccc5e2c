"""Does unloading a model give its memory back? RSS (and GPU memory on a GPU) before a load,
loaded, after one inference, after the unload, and after ten more load/infer/unload cycles,
for an ONNX model, a transformers model and a TorchScript model (backend torch) of a known
size, loaded and unloaded through the model manager as the daemon does it.

    .venv/bin/python -m tests.unload_memory [--mb 200] [--device cpu]

Prints one table (MB). The suite runs a smaller version (tests/integration/test_unload_memory.py).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from sightstream.config import ModelEntry
from sightstream.models.adapter import predict
from sightstream.models.catalogue import Catalogue
from sightstream.models.manager import ModelManager, give_back_memory

STEPS = ("before", "loaded", "inferred", "unloaded", "after_10_cycles")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def gpu_mb(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.memory_reserved(device) / 2**20


def build(folder: Path, mb: int) -> dict[str, dict[str, ModelEntry]]:
    from tests.tiny_hf import detr
    from tests.tiny_models import heavy_yolov8
    from tests.tiny_torch import heavy_yolo

    onnx_path = heavy_yolov8(folder / "heavy.onnx", mb)
    # about mb MB of float32 weights: 2 x layers x (attention 4 d^2 + ffn 2 d^2), d = 512
    layers = max(1, round(mb * 2**20 / 4 / (2 * 6 * 512**2)))
    torch_path = detr(folder / "detr", d_model=512, layers=layers)
    script_path = heavy_yolo(folder / "heavy.pt", mb)
    return {"heavy": {
        "onnx": ModelEntry(backend="onnx", task="detect", path=str(onnx_path), labels=["a", "b"]),
        "torch": ModelEntry(backend="transformers", task="detect", path=str(torch_path)),
        "torchscript": ModelEntry(backend="torch", task="detect", path=str(script_path), input_size=64,
                                  labels=["a", "b"]),
    }}


async def measure(manager: ModelManager, model: str, device: str, cycles: int = 10) -> dict[str, Any]:
    """RSS (and GPU memory) at each step of STEPS."""
    executor = ThreadPoolExecutor(1)
    image = [np.zeros((64, 64, 3), np.uint8)]
    row: dict[str, Any] = {}

    def note(step: str) -> None:  # no gc.collect() here: unloading must free memory by itself
        row[step] = rss_mb()
        if (gpu := gpu_mb(device)) is not None:
            row[f"{step}_gpu"] = gpu

    async def cycle(record: bool) -> None:
        await manager.load(model, device, executor)
        if record:
            note("loaded")
        async with manager.use(model, device, executor) as adapter:
            await asyncio.get_running_loop().run_in_executor(executor, predict, adapter, image)
        if record:
            note("inferred")
        manager.unload(model, device)
        if manager.memory_given_back is not None:
            await manager.memory_given_back

    # The frameworks' own code and global state are loaded once per process, not per model.
    import onnxruntime  # noqa: F401
    import transformers  # noqa: F401

    give_back_memory(device)  # the same start for every model: what earlier work left is trimmed
    note("before")
    await cycle(record=True)
    note("unloaded")
    for _ in range(cycles):
        await cycle(record=False)
    note("after_10_cycles")
    executor.shutdown()
    return row


def table(rows: dict[str, dict[str, Any]]) -> str:
    lines = ["| model | " + " | ".join(STEPS) + " |", "| --- |" + " --- |" * len(STEPS)]
    for model, row in rows.items():
        cells = [f"{row[s]:.0f}" + (f" (GPU {row[s + '_gpu']:.0f})" if s + "_gpu" in row else "")
                 for s in STEPS]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=200, help="each model's weights, about")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cycles", type=int, default=10)
    args = parser.parse_args()
    from sightstream import log

    log.configure("warning")
    with tempfile.TemporaryDirectory() as tmp:
        manager = ModelManager(Catalogue(build(Path(tmp), args.mb)))
        rows = {m: asyncio.run(measure(manager, m, args.device, args.cycles))
                for m in ("heavy/onnx", "heavy/torch", "heavy/torchscript")}
    print(f"RSS in MB, {args.mb} MB models on {args.device}:")
    print(table(rows))


if __name__ == "__main__":
    main()
