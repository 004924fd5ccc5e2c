"""The live page's memory: each source's latest frame and result, kept only as references
to what the pipeline already holds (the frame's encoded bytes, the result's fields), for a
bounded number of sources. Nothing is drawn until someone asks (`render`, in an executor)."""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from sightstream.frames import Frame
from sightstream.stages import exif_orientation as exif

MAX_SNAPSHOT_BYTES = 8 * 2**20  # a frame (encoded, or raw pixels) plus its payloads, at most
PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 190]],
                   dtype=np.uint8)


@dataclass(slots=True)
class Snapshot:
    pipeline: str
    source: str
    seq: int  # this daemon's count of results for the source
    version: str  # unique for this daemon's life: the image's ETag
    ts_ms: int
    published_ms: int
    fields: dict[str, Any]  # the result entry's fields (result JSON, payloads, model, task)
    image: bytes | None = None  # the frame as the producer sent it
    pixels: np.ndarray | None = field(default=None, repr=False)  # raw frames: the RGB array
    nbytes: int = 0
    _described: dict[str, Any] | None = field(default=None, repr=False)

    def describe(self) -> dict[str, Any]:
        """What GET /sources says of it: worked out once (the result's JSON parsed once)."""
        if self._described is None:
            f = self.fields
            self._described = {
                "pipeline": self.pipeline, "source": self.source, "seq": self.seq, "version": self.version,
                "ts_ms": self.ts_ms, "latency_ms": max(0, self.published_ms - self.ts_ms),  # as results do
                "model": _text(f.get("model")), "task": _text(f.get("task")),
                "prompt_version": int(f["prompt_version"]) if "prompt_version" in f else None,
                "summary": summarize(json.loads(f.get("result", "{}"))),
            }
        return self._described


class Snapshots:
    """At most `max_sources` sources and `max_bytes` of frames and payloads; the sources that
    published longest ago go first."""

    def __init__(self, max_sources: int = 64, max_bytes: int = 256 * 2**20) -> None:
        self.max_sources = max_sources
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._boot = secrets.token_hex(4)  # versions never repeat across restarts
        self._versions = 0
        self._latest: OrderedDict[tuple[str, str], Snapshot] = OrderedDict()
        self._seq: dict[tuple[str, str], int] = {}
        self._rendered: dict[tuple[str, str], tuple[str, bytes]] = {}
        self._dead: dict[tuple[str, str], int] = {}  # dead-lettered frames per source
        self._in: dict[tuple[str, str], int] = {}  # frames read per source
        # version -> its drawing under way (the live page's): viewers of one version share it
        self.drawing: dict[str, asyncio.Future] = {}

    def dead_lettered(self, frame: Frame) -> None:
        """A frame of this source went to the dead-letter stream."""
        _count(self._dead, (frame.pipeline, frame.source), 1, 4 * max(1, self.max_sources))

    def dead_count(self, pipeline: str, source: str) -> int:
        return self._dead.get((pipeline, source), 0)

    def frames_read(self, pipeline: str, source: str, frames: int) -> None:
        """Frames of this source read (the page's frames/s in)."""
        _count(self._in, (pipeline, source), frames, 4 * max(1, self.max_sources))

    def read_count(self, pipeline: str, source: str) -> int:
        return self._in.get((pipeline, source), 0)

    def record(self, frame: Frame, fields: dict[str, Any]) -> None:
        """A result was published: keep it and its frame as the source's latest (cheap: refs)."""
        if not self.max_sources:
            return
        key = (frame.pipeline, frame.source)
        image, pixels = frame.snapshot, None
        if image is None and frame.image is not None:
            pixels = frame.image
        size = (len(image) if image is not None else pixels.nbytes if pixels is not None else 0) + sum(
            len(v) for v in fields.values() if isinstance(v, bytes))
        if (image is None and pixels is None) or size > MAX_SNAPSHOT_BYTES:
            return
        seq = self._seq[key] = self._seq.get(key, 0) + 1
        self._versions += 1
        self._drop(key)
        self._latest[key] = Snapshot(frame.pipeline, frame.source, seq, f"{self._boot}-{self._versions}",
                                     frame.ts_ms, time.time_ns() // 1_000_000, fields, image, pixels, size)
        self.nbytes += size
        while len(self._latest) > self.max_sources or self.nbytes > self.max_bytes:
            oldest = next(iter(self._latest))
            self._drop(oldest)
            self._seq.pop(oldest, None)

    def _drop(self, key: tuple[str, str]) -> None:
        gone = self._latest.pop(key, None)
        if gone is not None:
            self.nbytes -= gone.nbytes
        self._rendered.pop(key, None)

    def list(self) -> list[Snapshot]:
        return sorted(self._latest.values(), key=lambda s: (s.pipeline, s.source))

    def get(self, pipeline: str, source: str) -> Snapshot | None:
        return self._latest.get((pipeline, source))

    def rendered(self, snap: Snapshot) -> bytes | None:
        cached = self._rendered.get((snap.pipeline, snap.source))
        return cached[1] if cached and cached[0] == snap.version else None

    def keep_rendered(self, snap: Snapshot, jpeg: bytes) -> None:
        """Cache a drawing, if its snapshot is still the source's latest."""
        if self._latest.get((snap.pipeline, snap.source)) is snap:
            self._rendered[(snap.pipeline, snap.source)] = (snap.version, jpeg)


def _count(counts: dict[tuple[str, str], int], key: tuple[str, str], n: int, most: int) -> None:
    """Add n to a source's count, keeping at most `most` sources: the one counted longest ago
    goes (a dict keeps insertion order: a count moves to the end when it changes), not the
    first seen, which is likely a camera still sending; the page would take its drop for a
    restart."""
    count = counts.pop(key, 0) + n
    if len(counts) >= most:
        counts.pop(next(iter(counts)))
    counts[key] = count


def render(snap: Snapshot, max_side: int = 960) -> bytes:
    """The frame with its result drawn on it, as a JPEG (blocking: run it in an executor)."""
    if snap.image is not None:  # as the result saw it: an EXIF orientation applied
        with Image.open(io.BytesIO(snap.image)) as im:
            turn = exif.orientation(snap.image, im)
            frame = Image.fromarray(exif.shown(np.asarray(im.convert("RGB")), turn))
    else:
        assert snap.pixels is not None
        frame = Image.fromarray(snap.pixels)
    result = json.loads(snap.fields.get("result", "{}"))
    width, height = result.get("width", frame.width), result.get("height", frame.height)
    canvas = np.asarray(frame, dtype=np.uint8).copy()
    if isinstance(snap.fields.get("mask"), bytes):
        canvas = _tint(canvas, np.asarray(Image.open(io.BytesIO(snap.fields["mask"]))))
    if isinstance(snap.fields.get("depth"), bytes):
        canvas = _colour_map(np.asarray(Image.open(io.BytesIO(snap.fields["depth"]))), canvas.shape[:2])
    image = Image.fromarray(canvas)
    scale = min(1.0, max_side / max(image.size))
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)))
    draw = ImageDraw.Draw(image)
    sx, sy = image.width / max(1, width), image.height / max(1, height)
    for k, det in enumerate(result.get("detections", [])):
        colour = tuple(int(c) for c in PALETTE[det.get("track_id", k) % len(PALETTE)])
        x1, y1, x2, y2 = det["box"]
        box = (x1 * sx, y1 * sy, x2 * sx, y2 * sy)
        draw.rectangle(box, outline=colour, width=2)
        label = f"{det.get('label', '')} {det.get('score', 0):.2f}"
        if "track_id" in det:
            label = f"#{det['track_id']} {label}"
        draw.text((box[0] + 3, max(0, box[1] - 12)), label, fill=colour)
    if text := result.get("text") or result.get("answer") or _top_labels(result):
        draw.rectangle((0, image.height - 18, image.width, image.height), fill=(0, 0, 0))
        draw.text((4, image.height - 15), str(text)[:160], fill=(255, 255, 255))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=80)
    return out.getvalue()


def _tint(canvas: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Pixels of each mask (non-zero ids of the PNG index map) tinted in its colour."""
    if index.shape[:2] != canvas.shape[:2]:
        index = np.asarray(Image.fromarray(index).resize((canvas.shape[1], canvas.shape[0]),
                                                         Image.Resampling.NEAREST))
    on = index > 0
    colours = PALETTE[index[on].astype(np.int64) % len(PALETTE)]
    canvas[on] = (canvas[on] * 0.5 + colours * 0.5).astype(np.uint8)
    return canvas


def _colour_map(depth: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A depth map (16-bit PNG) as colours, near warm and far cool."""
    d = depth.astype(np.float32)
    d = (d - d.min()) / max(1.0, float(d.max() - d.min()))
    stops = np.array([[48, 18, 59], [40, 160, 240], [120, 250, 90], [250, 180, 40], [180, 20, 10]],
                     np.float32)
    pos = d * (len(stops) - 1)
    lo = np.floor(pos).astype(np.int64).clip(0, len(stops) - 2)
    frac = (pos - lo)[..., None]
    rgb = (stops[lo] * (1 - frac) + stops[lo + 1] * frac).astype(np.uint8)
    if rgb.shape[:2] != shape[:2]:
        rgb = np.asarray(Image.fromarray(rgb).resize((shape[1], shape[0])))
    return rgb


def summarize(result: dict[str, Any]) -> str:
    """One line of what the result says: "2 x person, 1 x car", a caption, "3 masks"."""
    if "detections" in result:
        counts: dict[str, int] = {}
        for det in result["detections"]:
            # a track from a prompt's box has no label: it is an object all the same
            label = str(det.get("label") or ("tracked object" if "track_id" in det else "object"))
            counts[label] = counts.get(label, 0) + 1
        return ", ".join(f"{n} x {label}" for label, n in sorted(counts.items())) or "nothing found"
    if "masks" in result:
        return f"{len(result['masks'])} masks"
    if "labels" in result:
        return _top_labels(result) or "no label above the threshold"
    if "text" in result or "answer" in result:
        return str(result.get("text") or result.get("answer"))[:200]
    if "min" in result and "max" in result:
        return f"depth {result['min']:.2f} to {result['max']:.2f}"
    return ""


def _top_labels(result: dict[str, Any]) -> str:
    """A classifier's labels, best first: "tabby cat 0.81, tiger cat 0.12"."""
    return ", ".join(f"{x.get('label', '?')} {x.get('score', 0):.2f}" for x in result.get("labels", [])[:3])


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")
