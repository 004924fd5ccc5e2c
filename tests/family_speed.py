"""How fast each transformers family runs on this machine's CPU, with the tiny random-init
models the tests build (tests/tiny_*.py): the adapter's own prepare, device step and finish on
640x360 frames, per frame, at batch 1 and batch 8 (the median of five runs after a warm-up).
Tiny models time the adapter's work around the model (processors, tokenizers, decoding), not a
real checkpoint's speed.

    .venv/bin/python -m tests.family_speed [NAME]   # NAME: only the families whose name holds it

Prints one markdown table (docs/models.md has a run's).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sightstream.models.adapter import FrameContext, Prompt, predict
from sightstream.models.adapters import adapter_class
from tests import tiny_florence2, tiny_hf, tiny_smolvlm

# name, builder, adapter, options, prompt
FAMILIES: list[tuple[str, Callable[[Path], Path], str, dict[str, Any], str | None]] = [
    ("DETR", tiny_hf.detr, "hf_detection", {}, None),
    ("RT-DETR", tiny_hf.rtdetr, "hf_detection", {}, None),
    ("ViT (classify)", tiny_hf.vit_classifier, "hf_classify", {}, None),
    ("ConvNeXt (classify)", tiny_hf.convnext_classifier, "hf_classify", {}, None),
    ("OWLv2", tiny_hf.owlv2, "hf_open_vocab", {}, "cat. dog."),
    ("Grounding DINO", tiny_hf.grounding_dino, "hf_open_vocab", {}, "cat. dog."),
    ("Depth Anything", tiny_hf.depth_anything, "hf_depth", {}, None),
    ("BLIP caption", lambda f: tiny_hf.blip(f, "caption"), "hf_vlm", {"task": "caption", "max_new_tokens": 8}, ""),
    ("Qwen2.5-VL", tiny_hf.qwen2_5_vl, "hf_qwen_vl", {"task": "vqa", "max_new_tokens": 8}, "what is it?"),
    ("SmolVLM", tiny_smolvlm.smolvlm, "hf_smolvlm", {"task": "vqa", "max_new_tokens": 8}, "what is it?"),
    ("Florence-2 caption", tiny_florence2.florence2, "hf_florence2", {"task": "caption", "max_new_tokens": 8},
     None),
    ("Florence-2 detect", tiny_florence2.florence2, "hf_florence2", {"task": "detect", "max_new_tokens": 8},
     None),
    ("SAM2", tiny_hf.sam2, "hf_sam2", {}, '{"boxes": [[10, 10, 200, 200]]}'),
    ("text (Llama)", tiny_hf.causal_lm, "hf_text", {"max_new_tokens": 8}, "Summarise."),
]


def per_frame_ms(adapter: Any, frames: list[Any], prompt: Prompt | None) -> float:
    contexts = [FrameContext(f"s{i}", 0) for i in range(len(frames))] if adapter.uses_context else None
    predict(adapter, frames, prompt, contexts)  # warm-up
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        predict(adapter, frames, prompt, contexts)
        runs.append((time.perf_counter() - start) / len(frames) * 1000)
    return statistics.median(runs)


def main(only: str = "") -> None:
    """Every family's row, or those whose name contains `only` (the first argument)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (360, 640, 3), dtype=np.uint8)
    text = "[00:01] a person walks a dog\n[00:02] a red car parks next to a building"
    print("| family | adapter | ms per frame, batch 1 | ms per frame, batch 8 |")
    print("| --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as root:
        for i, (name, build, adapter_name, options, prompt) in enumerate(FAMILIES):
            if only not in name:
                continue
            folder = build(Path(root) / str(i))
            adapter = adapter_class(adapter_name)(str(folder), options)
            adapter.load("cpu")
            item: Any = text if adapter_name == "hf_text" else image
            p = Prompt(prompt, 1) if prompt is not None else None
            one, eight = per_frame_ms(adapter, [item], p), per_frame_ms(adapter, [item] * 8, p)
            print(f"| {name} | `{adapter_name}` | {one:.1f} | {eight:.1f} |", flush=True)
            adapter.unload()


if __name__ == "__main__":
    import sys

    main(" ".join(sys.argv[1:]))
