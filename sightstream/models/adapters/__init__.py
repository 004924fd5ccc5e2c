"""Adapters by name. Imported lazily so `sightstream --help` never imports a framework.

An entry's `adapter` is a built-in name, or a plugin of the user's own as "package.module:Class"
(any importable class implementing the Adapter protocol)."""

from __future__ import annotations

import importlib
import json
from typing import Any

from sightstream.errors import ModelError

# adapter name -> "module:Class" under sightstream.models.adapters
ADAPTERS = {
    "yolo": "yolo:YoloDetector",
    "torch_yolo": "yolo:TorchYoloDetector",
    "torch_segment": "onnx_segment:TorchSegmenter",
    "classifier": "classifier:OnnxClassifier",
    "torch_classifier": "classifier:TorchClassifier",
    "retinaface": "retinaface:RetinaFaceDetector",
    "onnx_segment": "onnx_segment:OnnxSegmenter",
    "hf_detection": "hf_detection:HfDetector",
    "hf_depth": "hf_depth:HfDepth",
    "hf_classify": "hf_classify:HfClassifier",
    "hf_open_vocab": "hf_open_vocab:HfOpenVocabDetector",
    "hf_vlm": "hf_vlm:HfImageToText",
    "hf_sam2": "hf_sam2:HfSam2",
    "hf_sam2_video": "hf_sam2_video:HfSam2Tracker",
    "sam2_package": "sam2_package:Sam2Package",
    "hf_qwen_vl": "hf_qwen_vl:HfQwenVL",
    "hf_smolvlm": "hf_smolvlm:HfSmolVLM",
    "hf_florence2": "hf_florence2:HfFlorence2",
    "hf_text": "hf_text:HfTextGenerator",
    "ocr": "ocr:RapidOcr",
}

# (backend, task) -> the adapter used when an entry names none
DEFAULT_ADAPTER = {
    ("onnx", "detect"): "yolo",
    ("onnx", "segment"): "onnx_segment",
    ("onnx", "classify"): "classifier",
    ("torch", "detect"): "torch_yolo",
    ("torch", "segment"): "torch_segment",
    ("torch", "classify"): "torch_classifier",
    ("transformers", "detect"): "hf_detection",
    ("transformers", "depth"): "hf_depth",
    ("transformers", "classify"): "hf_classify",
    ("transformers", "caption"): "hf_vlm",
    ("transformers", "vqa"): "hf_vlm",
    ("transformers", "segment"): "hf_sam2",
    ("transformers", "track"): "hf_sam2_video",
    ("transformers", "generate"): "hf_text",
    ("sam2", "segment"): "sam2_package",
}


def check_prompt(adapter: str, task: str, text: str) -> None:
    """Refuse, with the reason, a prompt the adapter cannot use (ModelError): set on a model that
    takes none, bad SAM2 JSON, no labels for an open-vocabulary detector, no vqa question."""
    cls = adapter_class(adapter)
    if not getattr(cls, "takes_prompt", False):
        raise ModelError("this model takes no prompt")
    check = getattr(cls, "check_prompt", None)
    if check is not None:
        try:
            check(text, task)
        except ModelError:
            raise
        except Exception as e:  # a plug-in's check that refuses with another error
            raise ModelError(f"{type(e).__name__}: {e}") from e


def check_chained_prompt(adapter: str, task: str, text: str) -> None:
    """A chained pipeline's prompt (prompt_from); refused with ModelError. Empty: the upstream
    detections are all there is. For an adapter whose boxes then come from upstream (SAM2's
    `chained_prompt_keeps_labels`): {"labels": [...]} keeping some of the upstream detections;
    boxes or points would be ignored, so they are refused, not taken silently. Otherwise (the
    tracker takes a fixed prompt's boxes on a source's first frame) as check_prompt."""
    if not text.strip():
        return
    if not getattr(adapter_class(adapter), "chained_prompt_keeps_labels", False):
        check_prompt(adapter, task, text)
        return
    try:
        spec = json.loads(text)
    except ValueError:
        spec = None
    labels = spec.get("labels") if isinstance(spec, dict) else None
    names = labels is None or (isinstance(labels, list) and all(isinstance(v, str) for v in labels))
    if not isinstance(spec, dict) or set(spec) - {"labels"} or not names:
        raise ModelError('a chained pipeline takes its boxes from the upstream pipeline\'s detections: its '
                         'prompt may only keep some of their labels, as {"labels": ["person"]}')


def adapter_class(name: str) -> Any:
    if name in ADAPTERS:
        module, cls = ADAPTERS[name].split(":")
        module = f"{__name__}.{module}"
    elif ":" in name:
        module, cls = name.split(":", 1)
    else:
        raise ModelError(
            f"unknown adapter {name!r}: use one of {', '.join(ADAPTERS)} or a plugin as 'module:Class'"
        )
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise ModelError(f"cannot import adapter {name!r}: {e}") from None
