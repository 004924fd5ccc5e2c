"""Tiny ONNX models built in the tests (no download), loaded through the same catalogue path
as a user's `[models.<family>.<variant>] path = ...`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# A constant detector's rows, for an ONNX export (constant_yolov8) or a TorchScript one
# (tests/tiny_torch.constant_yolo) alike.
ROWS = [
    # cx, cy, w, h, score(class 0), score(class 1) in the 64x64 input
    [32, 32, 20, 20, 0.10, 0.90],  # a strong class-1 box in the middle
    [33, 32, 20, 20, 0.10, 0.80],  # overlaps it: suppressed by NMS
    [33, 32, 20, 20, 0.70, 0.10],  # same place, other class: kept (class-aware NMS)
    [10, 10, 4, 4, 0.05, 0.10],  # below the score threshold
]


def constant_yolov8(path: Path, rows: list[list[float]], classes: int, *, size: int = 64,
                    names: dict[int, str] | None = None, transposed: bool = False) -> Path:
    """A YOLOv8-layout detector whose output is the same for every image: one row per anchor,
    [cx, cy, w, h, score_0, ..., score_{classes-1}] in input pixels (of a size x size input).

    The graph still reads its input (output = mean(x) * 0 + C), so batch size is dynamic and the
    model runs through ONNX Runtime like any export."""
    table = np.asarray(rows, dtype=np.float32)
    assert table.shape[1] == 4 + classes
    const = table[None] if transposed else table.T[None]  # [1, A, 4+C] or [1, 4+C, A]
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean"], keepdims=0, axes=[1, 2, 3]),
        helper.make_node("Reshape", ["mean", "shape"], ["mean3"]),
        helper.make_node("Mul", ["mean3", "zero"], ["zeros"]),
        helper.make_node("Add", ["zeros", "table"], ["output0"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([-1, 1, 1], dtype=np.int64), "shape"),
        numpy_helper.from_array(np.zeros((1, 1, 1), dtype=np.float32), "zero"),
        numpy_helper.from_array(const, "table"),
    ]
    graph = helper.make_graph(
        nodes, "constant_yolov8",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", *const.shape[1:]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if names is not None:
        helper.set_model_props(model, {"names": repr(names), "imgsz": repr([size, size])})
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def broken_model(path: Path) -> Path:
    """A model whose input rank is wrong for images: every call fails inside ONNX Runtime."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 7])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def red_segmenter(path: Path, size: int = 32) -> Path:
    """Semantic segmentation: class 1 where red > green, else class 0 (scores [batch, 2, h, w])."""
    nodes = [
        helper.make_node("Slice", ["x", "c0", "c1", "axis1"], ["red"]),
        helper.make_node("Slice", ["x", "c1", "c2", "axis1"], ["green"]),
        helper.make_node("Sub", ["red", "green"], ["diff"]),
        helper.make_node("Mul", ["diff", "zero"], ["background"]),
        helper.make_node("Concat", ["background", "diff"], ["scores"], axis=1),
    ]
    inits = [
        numpy_helper.from_array(np.array([v], dtype=np.int64), name)
        for name, v in (("c0", 0), ("c1", 1), ("c2", 2), ("axis1", 1))
    ] + [numpy_helper.from_array(np.zeros((1,), dtype=np.float32), "zero")]
    graph = helper.make_graph(
        nodes, "red_segmenter",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 2, size, size])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def heavy_yolov8(path: Path, megabytes: int, size: int = 64) -> Path:
    """A YOLOv8-layout detector carrying a weight of about `megabytes` MB that every call uses
    (a MatMul, so ONNX Runtime cannot fold it away): for measuring memory, not boxes. Its one
    anchor is a box of class 0 at the centre."""
    k = 1024
    m = max(1, megabytes * 2**20 // (4 * k))
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean"], keepdims=0, axes=[1, 2, 3]),
        helper.make_node("Reshape", ["mean", "column"], ["mean2"]),
        helper.make_node("Mul", ["mean2", "ones"], ["wide"]),  # [batch, k]
        helper.make_node("MatMul", ["wide", "big"], ["product"]),  # [batch, m]
        helper.make_node("ReduceMean", ["product"], ["pooled"], keepdims=0, axes=[1]),
        helper.make_node("Reshape", ["pooled", "shape"], ["pooled3"]),
        helper.make_node("Mul", ["pooled3", "zero"], ["zeros"]),
        helper.make_node("Add", ["zeros", "table"], ["output0"]),
    ]
    table = np.array([[size / 2, size / 2, size / 4, size / 4, 0.9, 0.1]], dtype=np.float32).T[None]
    inits = [
        numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), "column"),
        numpy_helper.from_array(np.ones((1, k), dtype=np.float32), "ones"),
        numpy_helper.from_array(np.random.default_rng(0).standard_normal((k, m), dtype=np.float32), "big"),
        numpy_helper.from_array(np.array([-1, 1, 1], dtype=np.int64), "shape"),
        numpy_helper.from_array(np.zeros((1, 1, 1), dtype=np.float32), "zero"),
        numpy_helper.from_array(table, "table"),
    ]
    graph = helper.make_graph(
        nodes, "heavy_yolov8",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 6, 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path
