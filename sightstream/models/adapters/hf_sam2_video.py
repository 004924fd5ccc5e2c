"""SAM2 tracking through transformers (`Sam2VideoModel`, streamed frame by frame): masks and
boxes for objects followed across a source's frames, each with a `track_id`.

What is tracked:
- the prompt's objects (`{"boxes": [...]}` or `{"points": [...]}`, as for SAM2 segmentation),
  taken on the first frame of each tracking session;
- in a chained pipeline (`prompt_from`), every upstream detection that overlaps no tracked
  object (IoU below `iou_match`) starts a new track; one that does renews that track's label.

State is kept per source (a `track_session`): SAM2's memory of the last frames of each object.
A session ends after `max_gap_ms` without a frame, when the pipeline's prompt changes (the new
prompt's objects are taken on the source's next frame), when the source comes back to this daemon
after another daemon had it (FrameContext.generation), when the adapter holds more than
`max_sources` sessions (the least recently seen goes), or when the model is unloaded; track
ids start again at 1 in the next session, whose `track_session` differs. The daemon sends all
frames of a source to one daemon and one device (see docs/models.md, "Tracking").

An object not seen for `max_lost_frames` frames is dropped. SAM2's per-frame history is
trimmed to what its memory reads (the last `num_maskmem` frames and object pointers), so a
session's memory stays flat however long the stream.

Result: `{"width", "height", "track_session", "detections": [{"box", "score", "track_id",
"label"?, "class_id"?}], "masks": [{"track_id", "area", "rle"}]}` and, in `mask`, a 16-bit PNG
whose pixels hold the track id (0: none).
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sightstream.frames import Prediction
from sightstream.models import masks
from sightstream.models.adapter import FrameContext, Prompt
from sightstream.models.adapters import hf_common
from sightstream.models.adapters.hf_sam2 import check_prompt, parse_prompt, preprocess

BOX_LABELS = (2, 3)  # SAM2's point labels for a box's two corners


@dataclass
class Track:
    label: str | None = None
    class_id: int | None = None
    box: list[float] | None = None  # where it was last seen, in frame pixels
    lost: int = 0  # frames since it was last seen


@dataclass
class SourceState:
    """One source's tracking session."""

    session: Any  # transformers' Sam2VideoInferenceSession
    name: str = field(default_factory=lambda: secrets.token_hex(4))
    generation: int = 0
    prompt_version: int = 0  # the prompt it began with
    frame_idx: int = -1
    last_ts: int = 0
    next_id: int = 1
    tracks: dict[int, Track] = field(default_factory=dict)


def iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def mask_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


class HfSam2Tracker(hf_common.HfAdapter):
    task = "track"
    takes_prompt = True
    check_prompt = staticmethod(check_prompt)
    uses_context = True

    def __init__(self, path: str, options: dict[str, Any]) -> None:
        super().__init__(path, options)
        self._max_lost = int(options.get("max_lost_frames", 30))
        self._iou_match = float(options.get("iou_match", 0.5))
        self._max_objects = int(options.get("max_objects", 32))
        self._max_gap_ms = int(options.get("max_gap_ms", 10_000))
        self._max_sources = int(options.get("max_sources", 64))
        self._sources: OrderedDict[str, SourceState] = OrderedDict()

    def load(self, device: str) -> None:
        source = self.source()
        from transformers import Sam2VideoModel

        self.placed(Sam2VideoModel.from_pretrained(source), device)
        config = self._model.config
        size = config.image_size
        self._side = int(size[0] if isinstance(size, (list, tuple)) else size)
        # What SAM2's memory reads back: older per-frame outputs are trimmed.
        self._history = max(config.num_maskmem, config.max_object_pointers_in_encoder)

    def unload(self) -> None:
        self._sources.clear()
        super().unload()

    @property
    def sessions(self) -> int:
        return len(self._sources)

    def infer(self, images: list[np.ndarray], prompt: Prompt | None = None,
              contexts: list[FrameContext] | None = None) -> list[Prediction]:
        spec = parse_prompt(prompt.text if prompt else "")
        version = prompt.version if prompt else 0
        if contexts is None:
            contexts = [FrameContext("", 0) for _ in images]
        return [self._track(image, ctx, spec, version) for image, ctx in zip(images, contexts)]

    def _state(self, ctx: FrameContext, prompt_version: int) -> tuple[SourceState, bool]:
        """The source's session, or a new one (first frame, after a gap, a new prompt). True: new."""
        from transformers.models.sam2_video.modeling_sam2_video import Sam2VideoInferenceSession

        state = self._sources.get(ctx.source)
        if (state is not None and state.generation == ctx.generation
                and state.prompt_version == prompt_version and ctx.ts_ms - state.last_ts <= self._max_gap_ms):
            self._sources.move_to_end(ctx.source)
            return state, False
        model = self._model
        device = model.device
        session = Sam2VideoInferenceSession(inference_device=device, inference_state_device=device,
                                            video_storage_device=device, dtype=model.dtype)
        state = self._sources[ctx.source] = SourceState(session, generation=ctx.generation,
                                                        prompt_version=prompt_version)
        while len(self._sources) > self._max_sources:
            self._sources.popitem(last=False)
        return state, True

    def _track(self, image: np.ndarray, ctx: FrameContext, spec: dict[str, Any],
               prompt_version: int) -> Prediction:
        import torch

        h, w = image.shape[:2]
        state, new = self._state(ctx, prompt_version)
        state.last_ts = max(state.last_ts, ctx.ts_ms)
        session = state.session
        session.video_height, session.video_width = h, w
        idx = state.frame_idx + 1
        if new:
            self._add_prompted(state, idx, spec, w, h)
        if ctx.detections:
            self._add_detected(state, idx, ctx.detections, spec.get("labels"), w, h)
        if not state.tracks:
            return self._prediction(state, np.zeros((0, h, w), bool), np.zeros(0), [], w, h)
        model = self._model
        pixels = torch.tensor(preprocess([image], self._side)).to(model.device, model.dtype)
        with torch.inference_mode():
            out = model(inference_session=session, frame=pixels, frame_idx=idx)
        state.frame_idx = idx
        logits = out.pred_masks.float()  # [objects, 1, h', w']
        full = torch.nn.functional.interpolate(logits, size=(h, w), mode="bilinear",
                                               align_corners=False)[:, 0] > 0
        presence = out.object_score_logits.float().reshape(-1)
        self._trim(session, idx)
        return self._prediction(state, full.cpu().numpy(), presence.cpu().numpy(), list(out.object_ids), w, h)

    def _add_object(self, state: SourceState, idx: int, points: list[list[float]], labels: Any,
                    track: Track, w: int, h: int) -> None:
        """A new track from a box's corners or points on this frame, in its pixels."""
        import torch

        scale = torch.tensor([self._side / w, self._side / h])
        session = state.session
        track_id = state.next_id
        state.next_id += 1
        obj_idx = session.obj_id_to_idx(track_id)
        session.add_point_inputs(obj_idx, idx, {
            "point_coords": (torch.tensor(points, dtype=torch.float32) * scale).reshape(1, 1, -1, 2),
            "point_labels": torch.tensor(labels, dtype=torch.int32).reshape(1, 1, -1),
        })
        session.obj_with_new_inputs.append(track_id)
        state.tracks[track_id] = track

    def _add_prompted(self, state: SourceState, idx: int, spec: dict[str, Any], w: int, h: int) -> None:
        for box in spec["boxes"]:
            corners = [[box[0], box[1]], [box[2], box[3]]]
            self._add_object(state, idx, corners, BOX_LABELS, Track(box=[float(v) for v in box]), w, h)
        for point, label in zip(spec["points"], spec["point_labels"]):
            self._add_object(state, idx, [point], [label], Track(), w, h)

    def _add_detected(self, state: SourceState, idx: int, detections: list[dict[str, Any]],
                      keep: list[str] | None, w: int, h: int) -> None:
        """Upstream detections: renew the track each overlaps, or start one."""
        for det in detections:
            if keep is not None and det.get("label") not in keep:
                continue
            box = [float(v) for v in det["box"]]
            matches = [(iou(box, t.box), tid) for tid, t in state.tracks.items() if t.box]
            best = max(matches, default=(0.0, 0))
            if best[0] >= self._iou_match:
                track = state.tracks[best[1]]
                track.label = det.get("label", track.label)
                track.class_id = det.get("class_id", track.class_id)
                continue
            if len(state.tracks) >= self._max_objects:
                continue
            self._add_object(state, idx, [box[:2], box[2:]], BOX_LABELS,
                             Track(det.get("label"), det.get("class_id"), box), w, h)

    def _prediction(self, state: SourceState, object_masks: np.ndarray, presence: np.ndarray,
                    object_ids: list[int], w: int, h: int) -> Prediction:
        index = np.zeros((h, w), dtype=np.uint16)
        detections, found = [], []
        gone = set()
        for k, track_id in enumerate(object_ids):
            track, mask = state.tracks[track_id], object_masks[k]
            if presence[k] <= 0 or not mask.any():
                track.lost += 1
                if track.lost > self._max_lost:
                    gone.add(track_id)
                continue
            track.lost, track.box = 0, mask_box(mask)
            index[mask] = min(track_id, 65535)
            det: dict[str, Any] = {"box": track.box, "score": round(float(1 / (1 + np.exp(-presence[k]))), 4),
                                   "track_id": track_id}
            if track.label is not None:
                det["label"] = track.label
            if track.class_id is not None:
                det["class_id"] = track.class_id
            detections.append(det)
            found.append({"track_id": track_id, "area": int(mask.sum()), "rle": masks.rle_encode(mask)})
        if gone:
            drop_objects(state.session, gone)
            for track_id in gone:
                del state.tracks[track_id]
        return Prediction({"width": w, "height": h, "track_session": state.name, "detections": detections,
                           "masks": found}, {"mask": masks.png(index)})

    def _trim(self, session: Any, idx: int) -> None:
        """Forget what SAM2's memory no longer reads: older frames and their outputs."""
        oldest = idx - self._history + 1  # the next frame reads at most history - 1 back
        for frame in [f for f in session.processed_frames if f < idx]:
            del session.processed_frames[frame]
        for obj_idx, outputs in session.output_dict_per_obj.items():
            for frame in [f for f in outputs["non_cond_frame_outputs"] if f < oldest]:
                del outputs["non_cond_frame_outputs"][frame]
            tracked = session.frames_tracked_per_obj[obj_idx]
            for frame in [f for f in tracked if f < oldest]:
                del tracked[frame]
            for inputs in (session.point_inputs_per_obj[obj_idx], session.mask_inputs_per_obj[obj_idx]):
                for frame in [f for f in inputs if f < oldest]:
                    del inputs[frame]


def drop_objects(session: Any, gone: set[int]) -> None:
    """Remove objects from a transformers Sam2VideoInferenceSession, which has no API for it:
    its per-object stores are indexed 0..n-1, so the survivors are renumbered in order.
    (Written against transformers 5.23's session layout.)"""
    keep = [obj_id for obj_id in session.obj_ids if obj_id not in gone]
    old = [session._obj_id_to_idx[obj_id] for obj_id in keep]
    for store in (session.point_inputs_per_obj, session.mask_inputs_per_obj,
                  session.output_dict_per_obj, session.frames_tracked_per_obj):
        survivors = [store[i] for i in old]
        store.clear()
        store.update(enumerate(survivors))
    session._obj_id_to_idx.clear()
    session._obj_idx_to_id.clear()
    for new, obj_id in enumerate(keep):
        session._obj_id_to_idx[obj_id] = new
        session._obj_idx_to_id[new] = obj_id
    session.obj_ids = keep
    session.obj_with_new_inputs = [o for o in session.obj_with_new_inputs if o not in gone]
