"""Test adapters, loaded through the catalogue as plugins (`adapter = "tests.fake_adapters:Scripted"`),
exactly as a user's own adapter would be. Their options script the faults a test needs."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import numpy as np

from sightstream.errors import ModelError
from sightstream.frames import Prediction

POISON = 13  # an image whose top-left red value is this makes its batch fail


class Scripted:
    """Options: `delay_s` (every call sleeps this long; `frame_s` more per frame), `hang_first_s` (the first call sleeps
    this long: a stuck model), `oom_above` (a bigger batch raises an out-of-memory error),
    `poison` (true: a batch holding a POISON image fails), `threshold` (a number: anything else
    breaks the constructor, as a bad option does), `fail_load` and `fail_unload` (true: that
    step raises, as a plug-in's bug would), `fail_load_unless` (a path: the load fails while no
    file is there, as a missing weights file does), `load_s` (the load takes this long), `claims_task` (the task it says it does)."""

    task = "detect"
    takes_prompt = False
    uses_context = False
    input_size = None

    def __init__(self, path: str, options: dict[str, Any]) -> None:
        self.delay_s = float(options.get("delay_s", 0))
        self.frame_s = float(options.get("frame_s", 0))  # more per frame of the call
        self.hang_first_s = float(options.get("hang_first_s", 0))
        self.oom_above = int(options.get("oom_above", 0))
        self.poison = bool(options.get("poison", False))
        self.threshold = float(options.get("threshold", 0))
        self.fail_load = bool(options.get("fail_load", False))
        self.fail_unload = bool(options.get("fail_unload", False))
        self.fail_load_unless = str(options.get("fail_load_unless", ""))
        self.load_s = float(options.get("load_s", 0))
        self.task = str(options.get("claims_task", self.task))  # a plug-in's own task attribute
        self.calls = 0
        self.batch_sizes: list[int] = []
        self._lock = threading.Lock()

    def load(self, device: str) -> None:
        time.sleep(self.load_s)
        if self.fail_load:
            raise KeyError("weights/layer3 (simulated)")
        if self.fail_load_unless and not os.path.exists(self.fail_load_unless):
            raise FileNotFoundError(f"no weights at {self.fail_load_unless} (simulated)")

    def unload(self) -> None:
        if self.fail_unload:
            raise RuntimeError("the unload broke (simulated)")

    def infer(self, images: list[np.ndarray], prompt: object = None) -> list[Prediction]:
        with self._lock:
            self.calls += 1
            first = self.calls == 1
        if first and self.hang_first_s:
            time.sleep(self.hang_first_s)
        if self.delay_s or self.frame_s:
            time.sleep(self.delay_s + self.frame_s * len(images))
        if self.oom_above and len(images) > self.oom_above:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        if self.poison and any(int(img[0, 0, 0]) == POISON for img in images):
            raise ValueError("this frame breaks the model (simulated)")
        self.batch_sizes.append(len(images))
        return [
            Prediction({"width": img.shape[1], "height": img.shape[0], "detections": [],
                        "batch": len(images)})
            for img in images
        ]


class Echo(Scripted):
    """A prompted model: each result says which prompt (text, version) it ran with."""

    takes_prompt = True

    @staticmethod
    def check_prompt(text: str, task: str) -> None:
        if not text.strip():
            raise ModelError("the echo model needs something to echo")

    def infer(self, images: list[np.ndarray], prompt: Any = None) -> list[Prediction]:
        predictions = super().infer(images, prompt)
        for p in predictions:
            p.result["prompt"] = {"text": prompt.text, "version": prompt.version} if prompt else None
        return predictions


class Brightest(Scripted):
    """A detector of a 64x64 input (so large JPEGs are decoded at reduced scale for it) that
    finds the bright pixels of the image it gets: its box, in that image's pixels, is where
    they are, whatever scale the decoder chose."""

    input_size = (64, 64)

    def infer(self, images: list[np.ndarray], prompt: object = None) -> list[Prediction]:
        out = []
        for img in images:
            ys, xs = np.nonzero(img.max(axis=2) > 200)
            box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
            out.append(Prediction({"width": img.shape[1], "height": img.shape[0], "detections": [
                {"box": box, "score": 1.0, "label": "bright", "class_id": 0}]}))
        return out


def entry(adapter: str = "Scripted", **options: Any) -> dict[str, Any]:
    """A `[models.fake.<variant>]` entry for one of these adapters."""
    return {"backend": "torch", "task": "detect", "adapter": f"tests.fake_adapters:{adapter}", **options}


class Staged:
    """A staged adapter (prepare, infer, finish) that records which thread ran each step and
    in what order. An image's top-left red value is its tag. Options (keys are tags, as
    strings): `prepare_s` and `infer_s` (seconds per tag; `infer_s` "*" for every tag),
    `hang` (tags whose device call sleeps this long), `await_next_prepare` (tags k whose device
    call waits, up to 5 s, until tag k+1's prepare has begun), `bad_finish` (a tag
    whose finish fails)."""

    task = "detect"
    takes_prompt = False
    uses_context = False
    input_size = None

    def __init__(self, path: str, options: dict[str, Any]) -> None:
        self.prepare_s = {int(k): float(v) for k, v in options.get("prepare_s", {}).items()}
        self.infer_s = {k: float(v) for k, v in options.get("infer_s", {}).items()}
        self.hang = {int(k): float(v) for k, v in options.get("hang", {}).items()}
        self.await_next = {int(t) for t in options.get("await_next_prepare", [])}
        self.bad_finish = int(options.get("bad_finish", -1))
        self.fail_multi = bool(options.get("fail_multi", False))
        self.unjsonable = int(options.get("unjsonable", -1))
        self.memory_mb = float(options.get("memory_mb", 0))
        self.task = str(options.get("claims_task", self.task))  # "track": batches must keep their order
        self.events: list[tuple[str, int, str]] = []  # (step, tag, thread name) as they began
        self.began: dict[tuple[str, int], float] = {}  # (step, tag) -> perf_counter when it began
        self.overlapped: dict[int, bool] = {}  # tag -> the next prepare began during its call
        self._changed = threading.Condition()

    def load(self, device: str) -> None:
        pass

    def unload(self) -> None:
        pass

    def _note(self, step: str, tags: list[int]) -> None:
        with self._changed:
            for tag in tags:
                self.events.append((step, tag, threading.current_thread().name))
                self.began[(step, tag)] = time.perf_counter()
            self._changed.notify_all()

    def prepare(self, images: list[np.ndarray], prompt: Any, contexts: Any) -> list[int]:
        tags = [int(img[0, 0, 0]) for img in images]
        self._note("prepare", tags)
        time.sleep(max(self.prepare_s.get(t, 0.0) for t in tags))
        return tags

    def infer(self, tags: list[int]) -> list[int]:
        self._note("infer", tags)
        if self.fail_multi and len(tags) > 1:
            raise ValueError("this batch fails as a whole (simulated)")
        time.sleep(max(self.hang.get(t, 0.0) for t in tags))
        time.sleep(max(self.infer_s.get(str(t), self.infer_s.get("*", 0.0)) for t in tags))
        if max(tags) in self.await_next:
            nxt = max(tags) + 1
            with self._changed:
                self.overlapped[max(tags)] = self._changed.wait_for(
                    lambda: ("prepare", nxt) in [(s, t) for s, t, _ in self.events], 5)
        return tags

    def finish(self, tags: list[int], outputs: list[int]) -> list[Prediction]:
        self._note("finish", tags)
        if self.bad_finish in tags and len(tags) > 1:
            raise ValueError("this batch cannot be finished (simulated)")
        if self.bad_finish in tags:
            raise ValueError("this frame cannot be finished (simulated)")
        return [Prediction({"width": 4, "height": 4, "detections": [], "tag": t,
                            **({"bad": {t}} if t == self.unjsonable else {})}) for t in outputs]


class FailingText:
    """A text model (task generate) that loads and counts tokens as the real one does, and whose
    every call fails: summaries that cannot be written. Built lazily: transformers is heavy."""

    def __new__(cls, path: str, options: dict[str, Any]) -> Any:
        from sightstream.models.adapters.hf_text import HfTextGenerator

        class Failing(HfTextGenerator):
            def infer(self, inputs: Any) -> Any:
                raise RuntimeError("the text model broke (simulated)")

        return Failing(path, options)
