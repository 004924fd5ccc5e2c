"""The contract in code: a Frame as producers XADD it, and the Outcome of each frame
(a result, a dead-letter entry, or a plain acknowledgement) as the publisher writes it."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sightstream import keys
from sightstream.errors import FrameError
from sightstream.prompts import Prompt

PIX_FMTS = {"rgb24": 3, "bgr24": 3, "gray8": 1}
# A frame's `ts` goes into results as a JSON integer, and FPS sampling and latency count on
# it. Up to the year 5138: microseconds (now 1.8e15) passed for ms of the year 58,000 and
# undid FPS sampling (every frame kept) and live mode without a word; nanoseconds too.
MAX_TS_MS = 10**14 - 1
# Entry IDs Redis makes are its clock's ms (over 10**12 since 2001); a producer's own smaller
# IDs (`XADD key 1-1`) are no time: its frames' arrival is not known.
MIN_CLOCK_ID_MS = 10**12


def _not_json(constant: str) -> Any:
    """Python's json reads NaN and Infinity, which are not JSON: consumers' parsers refuse them."""
    raise ValueError(f"{constant} is not JSON")


def entry_ms(entry_id: str) -> int:
    """The milliseconds part of a stream entry ID ("1700000000000-3")."""
    return int(entry_id.split("-", 1)[0])


def arrival_ms(entry_id: str) -> int | None:
    """When an entry reached Redis, by Redis's clock: its ID's ms, where the ID is a time."""
    ms = entry_ms(entry_id)
    return ms if ms >= MIN_CLOCK_ID_MS else None


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(slots=True, eq=False)
class Frame:
    """Everything later stages need about one input entry. Stages never look back upstream:
    `release` gives back the frame's in-flight credit once the frame is acknowledged.

    `stream` and `entry_id` name the entry read (and acknowledged). Results speak of `source`
    and `frame_id`: the same entry, except in a chained pipeline (`prompt_from`), which reads
    an upstream pipeline's result entries and reports the frame they describe."""

    pipeline: str
    stream: str
    entry_id: str
    fields: dict[bytes, bytes]
    ts_ms: int
    meta: bytes | None = None
    deliveries: int = 1
    release: Callable[[], None] = field(default=lambda: None, repr=False)
    image: np.ndarray | None = field(default=None, repr=False)  # RGB, HxWx3 uint8
    orig_size: tuple[int, int] = (0, 0)  # (width, height) before any scaled decoding
    origin: tuple[str, str] | None = None  # chained: (source key, frame entry ID) of the frame
    detections: list[dict[str, Any]] | None = None  # chained: the upstream's detections
    generation: int = 0  # bumped each time this daemon takes the stream (source leases)
    # False once Redis has dropped the entry from the group's pending list: it was trimmed or
    # deleted, and XAUTOCLAIM reported its ID, once, to this daemon. Its outcome is then
    # written once (a marker key says so), with nothing to acknowledge.
    pending: bool = True
    # Frames from no stream (/predict, jobs): the worker answers here instead of publishing.
    reply: asyncio.Future[Outcome] | None = field(default=None, repr=False)
    snapshot: bytes | None = field(default=None, repr=False)  # the encoded image, for the live page
    # A text model's input instead of an image (job summaries, /predict with text).
    text: str | None = field(default=None, repr=False)
    # Live mode counts the frames ahead of one read: not those a device took, nor those with an
    # outcome already (dropped, sampled out, dead-lettered), held until it is acknowledged.
    at_device: bool = False
    settled: bool = False
    # When the entry reached Redis (arrival_ms): live mode ages a frame from then, whatever
    # the producer's clock says. None: a frame from no stream (decoded here: its ts is ours).
    arrived_ms: int | None = None

    @property
    def source(self) -> str:
        return self.origin[0] if self.origin else self.stream

    @property
    def frame_id(self) -> str:
        return self.origin[1] if self.origin else self.entry_id

    def parse_fields(self) -> None:
        """Check the entry's fields and take `ts` and `meta` from them. Raises FrameError.

        The image itself is checked later, by the decoder, off the event loop."""
        fields = self.fields
        if not fields:
            raise FrameError("empty_entry", "the entry has no fields (trimmed or deleted)")
        if b"image" not in fields and b"raw" not in fields:
            raise FrameError("missing_image", "the entry has neither an `image` nor a `raw` field")
        ts = fields.get(b"ts")
        if ts is not None:
            self.ts_ms = _checked_ts(ts)
        self.meta = _checked_meta(fields.get(b"meta"))

    def parse_upstream_result(self) -> None:
        """A chained pipeline's entry is an upstream result: take the frame it describes and
        its detections from it. Raises FrameError. The frame's own fields are fetched next."""
        fields = self.fields
        if not fields:
            raise FrameError("empty_entry", "the entry has no fields (trimmed or deleted)")
        try:
            source, frame_id = fields[b"source"].decode(), fields[b"frame_id"].decode()
            result = json.loads(fields[b"result"], parse_constant=_not_json)
            detections = result["detections"]
            ts = fields[b"ts"]
        except (KeyError, ValueError, TypeError, UnicodeDecodeError, RecursionError):
            raise FrameError(
                "bad_fields", "a chained pipeline reads detect results: the entry needs `source`, "
                "`frame_id`, `ts` and a `result` with `detections` (strict JSON)"
            ) from None
        if not isinstance(detections, list) or not all(isinstance(d, dict) and _is_box(d.get("box"))
                                                        for d in detections):
            raise FrameError("bad_fields", "the upstream result's `detections` need a `box` each: "
                                           "[x1, y1, x2, y2], numbers with x1 <= x2 and y1 <= y2")
        self.ts_ms = _checked_ts(ts)  # as a producer's
        self.origin = (source, frame_id)
        try:  # live mode ages it from when the frame itself reached Redis, not its upstream result
            self.arrived_ms = arrival_ms(frame_id)
        except ValueError:  # a job's frame (its index): its ts, taken by the daemon that read it
            self.arrived_ms = None
        self.detections = detections
        self.meta = _checked_meta(fields.get(b"meta"))  # it is copied into this pipeline's result


def _checked_ts(ts: bytes) -> int:
    """`ts` as integer ms since the epoch, from 0 to MAX_TS_MS; else FrameError. A decimal
    fraction is cut off (`time.time() * 1000` written as it is: every frame was lost)."""
    whole, dot, fraction = ts.partition(b".")
    if not whole.isdigit() or not whole.isascii() or (dot and fraction and not fraction.isdigit()):
        # int() would take "+5", " 5" and "1_000"
        raise FrameError("bad_fields", f"`ts` must be ms since the epoch (digits), got {ts[:40]!r}")
    if len(whole) > 20 or int(whole) > MAX_TS_MS:
        raise FrameError("bad_fields", f"`ts` must be ms since the epoch, from 0 to {MAX_TS_MS} (the year "
                                       f"5138); got {ts[:40]!r}: microseconds or nanoseconds?")
    return int(whole)


def _is_box(box: Any) -> bool:
    return (isinstance(box, list) and len(box) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)
            and box[0] <= box[2] and box[1] <= box[3])


# Deeper than this, a `meta` is refused: Python's JSON reader and writer recurse, so a deep one
# would fail wherever it is read again (the jobs API, `tail`), or crash the reading stage itself.
MAX_META_DEPTH = 64


def _checked_meta(meta: bytes | None) -> bytes | None:
    """`meta` as sent, if it is a JSON object (strict JSON, UTF-8, at most MAX_META_DEPTH
    levels deep); else FrameError."""
    if meta is None:
        return None
    try:
        value = json.loads(meta.decode(), parse_constant=_not_json)
    except UnicodeDecodeError:
        raise FrameError("bad_fields", "`meta` must be UTF-8 JSON: it holds bytes that are not "
                                       "UTF-8") from None
    except RecursionError:  # deeper than Python's reader goes: far past the limit
        raise FrameError("bad_fields", f"`meta` is nested more than {MAX_META_DEPTH} levels deep") from None
    except ValueError:
        raise FrameError("bad_fields", "`meta` must be a JSON object (strict JSON: no NaN)") from None
    if not isinstance(value, dict):
        raise FrameError("bad_fields", "`meta` must be a JSON object (strict JSON: no NaN)")
    if _depth(value) > MAX_META_DEPTH:
        raise FrameError("bad_fields", f"`meta` is nested more than {MAX_META_DEPTH} levels deep")
    return meta


def _depth(value: Any) -> int:
    """How many objects and arrays deep a parsed JSON value goes (without recursing)."""
    deepest, level = 0, [(value, 1)]
    while level:
        item, depth = level.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            level.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


@dataclass(slots=True)
class Prediction:
    """What an adapter returns per image: the `result` JSON and optional binary payloads
    (`mask`, `depth`) published as their own fields."""

    result: dict[str, Any]
    payloads: dict[str, bytes] = field(default_factory=dict)


@dataclass(slots=True)
class Published:
    frame: Frame
    stream: str
    fields: dict[str, str | bytes]


@dataclass(slots=True)
class DeadLettered:
    frame: Frame
    stream: str
    reason: str
    error: str

    def __post_init__(self) -> None:
        self.frame.settled = True

    @classmethod
    def of(cls, frame: Frame, reason: str, error: str) -> DeadLettered:
        """A frame's dead-letter outcome, in its pipeline's dead-letter stream for its source."""
        return cls(frame, keys.deadletter_stream(frame.pipeline, frame.source), reason, error)


@dataclass(slots=True)
class Acked:
    """Acknowledged with no output: skipped by the FPS sampler, or dropped as stale."""

    frame: Frame
    reason: str

    def __post_init__(self) -> None:
        self.frame.settled = True


Outcome = Published | DeadLettered | Acked


def result_fields(
    frame: Frame,
    *,
    model: str,
    task: str,
    prediction: Prediction,
    prompt_version: int | None = None,
) -> dict[str, str | bytes]:
    """The result entry's fields, as the contract lists them. `latency_ms` is filled in by the
    publisher at publication time."""
    out: dict[str, str | bytes] = {
        "source": frame.source,
        "frame_id": frame.frame_id,
        "ts": str(frame.ts_ms),
        "pipeline": frame.pipeline,
        "model": model,
        "task": task,
        "result": result_json(prediction.result),
    }
    if prompt_version is not None:
        out["prompt_version"] = str(prompt_version)
    out.update(prediction.payloads)
    if frame.meta is not None:
        out["meta"] = frame.meta
    return out


def result_json(result: Any) -> str:
    """A result as strict JSON, which every reader parses (JavaScript's JSON.parse refuses NaN):
    numpy numbers and arrays become JSON's; a NaN or an infinity is a ValueError naming where
    it is. Raises TypeError for anything else JSON cannot carry."""
    try:
        return json.dumps(result, separators=(",", ":"), allow_nan=False, default=_numpy_to_json)
    except ValueError:
        raise ValueError(f"it holds NaN or an infinity, which JSON cannot carry, at "
                         f"{_non_finite_at(result) or 'an unknown place'}") from None


def _numpy_to_json(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _non_finite_at(value: Any, path: str = "result") -> str | None:
    """Where the first NaN or infinity is, as `result.detections[0].box[2]`."""
    if isinstance(value, (np.generic, np.ndarray)):
        value = value.tolist()
    if isinstance(value, float):
        return None if np.isfinite(value) else path
    if isinstance(value, dict):
        items: Any = ((f"{path}.{k}", v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    return next((found for sub, v in items if (found := _non_finite_at(v, sub))), None)


def deadletter_fields(frame: Frame, reason: str, error: str) -> dict[str, str | bytes]:
    out: dict[str, str | bytes] = {
        "source": frame.source,
        "frame_id": frame.frame_id,
        "ts": str(frame.ts_ms),
        "pipeline": frame.pipeline,
        "reason": reason,
        "error": error,
        "deliveries": str(frame.deliveries),
    }
    if frame.meta is not None:
        out["meta"] = frame.meta
    return out


def empty_box(box: list[float]) -> bool:
    """A box with no width or height once clipped to the frame: it lay wholly outside it (in
    the grey a letterbox or a square pad adds) and describes no pixel of the frame."""
    return box[2] <= box[0] or box[3] <= box[1]


def decoded_scale(size: tuple[int, int], decoded: tuple[int, int]) -> tuple[float, float]:
    """How many of a frame's pixels (width, height) one pixel of its decoded image spans. A JPEG
    decoded at 1/d scale has ceil(side / d) pixels a side, each d wide but the last (cut): d,
    not side / pixels, maps a coordinate back (577 rows at 1/8 are 73, and 577 / 73 put a box
    at the bottom 3 px high)."""
    (w, h), (dw, dh) = size, decoded
    for d in (2, 4, 8):
        if -(-w // d) == dw and -(-h // d) == dh:
            return float(d), float(d)
    return w / dw, h / dh


def scale_detections(result: dict[str, Any], sx: float, sy: float, width: int, height: int) -> None:
    """Map boxes, landmarks and outlines (a polygon, or several) from decoded-image pixels back
    to the original frame's pixels (the decoder may have decoded a JPEG at 1/2, 1/4 or 1/8
    scale: `decoded_scale`), or the other way. Boxes stay within `width` x `height`."""
    result["width"], result["height"] = width, height

    def points(pts: list[list[float]]) -> list[list[float]]:
        return [[round(x * sx, 1), round(y * sy, 1)] for x, y in pts]

    for det in result.get("detections", ()):
        x1, y1, x2, y2 = det["box"]
        det["box"] = [round(min(x1 * sx, width), 1), round(min(y1 * sy, height), 1),
                      round(min(x2 * sx, width), 1), round(min(y2 * sy, height), 1)]
        if "landmarks" in det:
            det["landmarks"] = points(det["landmarks"])
        if "polygon" in det:
            det["polygon"] = points(det["polygon"])
        if "polygons" in det:
            det["polygons"] = [points(p) for p in det["polygons"]]


def is_stale(frame: Frame, max_age_ms: int) -> bool:
    """Live mode: a frame older than `max_age_ms` is dropped, not processed. Its age counts
    from when it reached Redis, not from its capture time: a camera whose clock was 2 s
    behind lost every frame (each read as 2 s old), one ahead had its backlog served."""
    since = frame.arrived_ms if frame.arrived_ms is not None else frame.ts_ms
    return max_age_ms > 0 and now_ms() - since > max_age_ms


def drop_stale(frames: list[Frame], max_age_ms: int) -> tuple[list[Frame], list[Outcome]]:
    """Live mode: the frames still fresh, and an Acked("stale") outcome for each of the others
    (judged once per frame: the clock moves)."""
    fresh: list[Frame] = []
    dropped: list[Outcome] = []
    for frame in frames:
        if is_stale(frame, max_age_ms):
            dropped.append(Acked(frame, "stale"))
        else:
            fresh.append(frame)
    return fresh, dropped


@dataclass(slots=True, eq=False)
class Batch:
    """Frames of one pipeline, for one model call."""

    pipeline: str
    model: str
    output: str  # the pipeline's output stream template
    max_age_ms: int
    frames: list[Frame]
    # The pipeline's prompt when the batch closed (prompts.py); results record its version.
    prompt: Prompt = Prompt("", 1)
    id: str = ""  # "<device>/<n>", given by the worker that runs it: log lines name it
    # Live mode: told how many frames the device took, when it takes them (stages/queue_wait.py)
    taken: Callable[[int], None] | None = field(default=None, repr=False)
