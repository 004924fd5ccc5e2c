"""Tiny TorchScript and torch.export models built in the tests (no download), loaded through
the catalogue as a user's `backend = "torch"` entry is: a constant YOLOv8-layout detector
saved as Ultralytics' TorchScript export is (with its config.txt), a red/green segmenter
returning a dict as torchvision's models do, and a classifier of the mean colour."""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn


@contextmanager
def legacy():
    """TorchScript (and the ONNX exporter built on it) warn that they are deprecated in torch
    2.13; users' files are still made this way (Ultralytics' torchscript export)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


class ConstantYolo(nn.Module):
    """The same [batch, 4 + classes, anchors] output for every image (it still reads its input,
    so the batch size follows the input's)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3)).reshape(-1, 1, 1) * 0 + self.table


def constant_yolo(path: Path, rows: list[list[float]], classes: int, *, size: int = 64,
                  names: dict[int, str] | None = None) -> Path:
    """A TorchScript file as Ultralytics' `format="torchscript"` export writes it: rows are
    [cx, cy, w, h, score_0, …] in input pixels of a size x size input; config.txt holds imgsz
    and names when `names` is given."""
    table = torch.tensor(rows, dtype=torch.float32)
    assert table.shape[1] == 4 + classes
    extra = {}
    if names is not None:
        extra["config.txt"] = json.dumps({"imgsz": [size, size], "names": {str(k): v for k, v in names.items()}})
    with legacy():
        torch.jit.save(torch.jit.script(ConstantYolo(table.T.unsqueeze(0))), str(path), _extra_files=extra)
    return path


class RedSegmenter(nn.Module):
    """Class 1 where red > green, else 0, as per-class scores in a dict (torchvision's `out`)."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        diff = x[:, 0:1] - x[:, 1:2]
        return {"out": torch.cat([diff * 0, diff], dim=1), "aux": diff}


def red_segmenter(path: Path, exported: bool = False, size: int = 32) -> Path:
    """TorchScript (`.pt`), or torch.export (`.pt2`, dynamic batch) when `exported`."""
    if exported:
        batch = torch.export.Dim("batch", min=1, max=64)
        program = torch.export.export(RedSegmenter(), (torch.zeros(2, 3, size, size),),
                                      dynamic_shapes={"x": {0: batch}})
        torch.export.save(program, str(path))
    else:
        with legacy():
            torch.jit.save(torch.jit.script(RedSegmenter()), str(path))
    return path


class MeanColour(nn.Module):
    """Logits for red, green and blue: the mean of each channel (on 0-1 pixels) times 10."""

    def __init__(self, probabilities: bool) -> None:
        super().__init__()
        self.probabilities = probabilities

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = x.mean(dim=(2, 3)) * 10
        return logits.softmax(dim=1) if self.probabilities else logits


def colour_classifier(path: Path, probabilities: bool = False, names: list[str] | None = None) -> Path:
    extra = {"config.txt": json.dumps({"names": {str(i): n for i, n in enumerate(names)}})} if names else {}
    with legacy():
        torch.jit.save(torch.jit.script(MeanColour(probabilities)), str(path), _extra_files=extra)
    return path


class HeavyYolo(nn.Module):
    """A YOLOv8-layout detector whose every call uses a k x k weight (about 4 k^2 bytes): for
    measuring memory, not boxes. Its output is ConstantYolo's, for two classes."""

    def __init__(self, k: int, table: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(k, k) * 1e-3)
        self.register_buffer("table", table.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3)).reshape(-1, 1).expand(-1, self.weight.shape[0])
        return (mean @ self.weight).sum(dim=1).reshape(-1, 1, 1) * 0 + self.table


def heavy_yolo(path: Path, megabytes: int) -> Path:
    """A TorchScript file of about `megabytes` MB of float32 weights (a 64x64 input)."""
    k = round((megabytes * 2**20 / 4) ** 0.5)
    table = torch.tensor([[32, 32, 20, 20, 0.1, 0.9]], dtype=torch.float32).T.unsqueeze(0)
    with legacy():
        torch.jit.save(torch.jit.script(HeavyYolo(k, table)), str(path))
    return path
