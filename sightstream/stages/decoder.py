"""Decoder: image bytes or raw pixels to an RGB array, off the event loop.

The format is told by magic bytes, never by a field. Pixel counts are checked from the header
before any pixel is decoded (decompression bombs). When the model's preprocessing would scale
a frame to at most half its size (its InputShape), JPEGs are decoded at a reduced scale by the
DCT, never below what the model keeps: the model would shrink the frame anyway, and boxes (and
the result's width and height) are mapped back to full-frame pixels.

JPEGs in YCbCr or grey (every camera's) go straight to libjpeg-turbo through simplejpeg:
5x less fixed cost than Pillow on a small frame, a third less time on a 1280x720 one, the same
pixels at full size and at 1/2, 1/4 and 1/8 scale.
Other JPEGs (CMYK), any JPEG simplejpeg refuses (corrupt, truncated: Pillow then says why) and
the other formats go through Pillow.
"""

from __future__ import annotations

import asyncio
import io
import math
import re
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import numpy as np
import simplejpeg
from PIL import Image

from sightstream.errors import FrameError
from sightstream.frames import PIX_FMTS, DeadLettered, drop_stale
from sightstream.metrics import Metrics
from sightstream.models.input_shape import InputShape
from sightstream.stages import exif_orientation as exif
from sightstream.stages.flow import STOP, drain_nowait
from sightstream.stages.gpu_jpeg import JpegBatchDecoder

# Our own cap (`decode.max_pixels`) is checked right after the header is read, before any
# pixel is decoded; Pillow's global check would fire first with its own limits and warnings.
Image.MAX_IMAGE_PIXELS = None

Pixels = tuple[np.ndarray, tuple[int, int]]  # RGB, and the frame's (width, height)

MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"BM", "BMP"),
)


def sniff(data: bytes) -> str:
    for magic, fmt in MAGIC:
        if data.startswith(magic):
            return fmt
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    raise FrameError(
        "unsupported_format",
        "the image is not JPEG, PNG, WebP or BMP (by its first bytes)"
        if data else "the image is empty",
    )


def decode_image(
    data: bytes, max_pixels: int, target: InputShape | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Encoded bytes to (RGB array, original (width, height)), as viewers show the image (its
    EXIF orientation applied: stages/exif_orientation.py). Raises FrameError."""
    fmt = sniff(data)
    orientation = exif.jpeg_orientation(data) if fmt == "JPEG" else 1
    if fmt == "JPEG" and (fast := _turbo_jpeg(data, max_pixels, target, orientation)) is not None:
        return _shown(fast, orientation)
    try:
        im = Image.open(io.BytesIO(data), formats=[fmt])
        width, height = im.size
        check_pixels(width, height, max_pixels)
        if fmt == "JPEG" and (least := _least_size(width, height, target, orientation)) is not None:
            im.draft("RGB", least)
        array = rgb_array(im)
        if fmt != "JPEG":
            orientation = exif.pillow_orientation(im)
    except FrameError:
        raise
    except Exception as e:  # Pillow raises many types for corrupt or truncated data
        raise FrameError("bad_image", f"the {fmt} image cannot be decoded: {_pillow_says(e)}") from None
    return _shown((array, (width, height)), orientation)


def _shown(decoded: Pixels, orientation: int) -> Pixels:
    array, (width, height) = decoded
    return exif.shown(array, orientation), exif.shown_size(width, height, orientation)


def _least_size(width: int, height: int, target: InputShape | None,
                orientation: int) -> tuple[int, int] | None:
    """draft_size for the image as shown (the model sees it turned), in its stored order."""
    if orientation not in exif.TURNED:
        return draft_size(width, height, target)
    least = draft_size(height, width, target)
    return None if least is None else (least[1], least[0])


def _pillow_says(error: Exception) -> str:
    """Pillow's message without the in-memory file it names ("cannot identify image file
    <_io.BytesIO object at 0x7fca…>"): that means nothing to whoever sent the frame."""
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(error)) or type(error).__name__


def image_pixels(data: bytes) -> int:
    """Width x height from the image's header (no pixel decoded); 0 when it cannot be read
    (decoding it then says why)."""
    try:
        width, height = Image.open(io.BytesIO(data), formats=[sniff(data)]).size
    except Exception:  # Pillow raises many types for corrupt data
        return 0
    return width * height


def rgb_array(im: Image.Image) -> np.ndarray:
    """An opened image's pixels as HxWx3 uint8 RGB. A 16-bit grey PNG (mode I;16) keeps its
    picture: Pillow's convert("RGB") clips its samples at 255, which whitens the frame."""
    if im.mode == "RGB":  # convert() copies even then: 1.5 of 5.7 ms for a 1280x720 JPEG
        return np.asarray(im)
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        grey = np.asarray(im).astype(np.float32)
        top = float(grey.max(initial=0))
        if im.mode == "F" and top <= 1:
            scale = 255.0  # a float image of 0..1 (a TIFF a folder may hold)
        elif im.mode == "I" and top <= 255:
            scale = 1.0  # samples that fit 8 bits
        else:
            scale = 255 / 65535  # 16-bit samples (PNG's)
        grey = np.clip(np.rint(grey * scale), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


def check_pixels(width: int, height: int, max_pixels: int, what: str = "image") -> None:
    """The pixel cap, checked from the header before any pixel is decoded. Raises FrameError."""
    if width * height > max_pixels:
        raise FrameError("too_large", f"the {what} is {width}x{height}, over the {max_pixels}-pixel limit")


def draft_size(width: int, height: int, target: InputShape | None) -> tuple[int, int] | None:
    """The least size a JPEG may be DCT-scaled to for a model that sizes frames as `target`
    does, or None: decode at full size (no target, or the model keeps more than half the frame)."""
    if target is None:
        return None
    scale = target.scale(width, height)
    if scale > 0.5:
        return None
    return max(1, math.ceil(width * scale - 1e-6)), max(1, math.ceil(height * scale - 1e-6))


def _turbo_jpeg(data: bytes, max_pixels: int, target: InputShape | None,
                orientation: int = 1) -> tuple[np.ndarray, tuple[int, int]] | None:
    """A YCbCr or grey JPEG through simplejpeg; None: Pillow decodes it (and names any error)."""
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except Exception:  # noqa: BLE001 - any refusal (a subsampling it has no name for raises KeyError)
        return None
    check_pixels(width, height, max_pixels)
    if colorspace not in ("YCbCr", "Gray"):
        return None
    least = (0, 0)
    if (wanted := _least_size(width, height, target, orientation)) is not None:
        # 1/2, 1/4 or 1/8, picked as Pillow's draft picks them: libjpeg-turbo's other n/8
        # factors take a slow path (3/8 of a 1080p frame costs more than 1/2)
        fits = min(width // wanted[0], height // wanted[1])
        d = next(d for d in (8, 4, 2, 1) if fits >= d)
        least = (-(-width // d), -(-height // d))
    # Lenient, as Pillow is, when the end marker is there (cameras that leave stray bytes before
    # it would be decoded twice otherwise); strict without it, so a truncated frame is refused.
    strict = not data.rstrip(b"\x00").endswith(b"\xff\xd9")
    try:
        pixels = simplejpeg.decode_jpeg(data, "RGB", min_width=least[0], min_height=least[1], strict=strict)
    except Exception:  # noqa: BLE001 - corrupt or unsupported: Pillow decodes it or says why
        return None
    return pixels, (width, height)


def decode_raw(fields: dict[bytes, bytes], max_pixels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Raw pixels (`raw`, `width`, `height`, `pix_fmt`) to (RGB array, (width, height))."""
    try:
        width, height = int(fields[b"width"]), int(fields[b"height"])
        pix_fmt = fields[b"pix_fmt"].decode()
    except KeyError as e:
        raise FrameError("bad_raw", f"a `raw` frame needs the {e.args[0].decode()!r} field") from None
    except (ValueError, UnicodeDecodeError):
        raise FrameError("bad_raw", "`width` and `height` must be integers") from None
    if pix_fmt not in PIX_FMTS:
        raise FrameError("bad_raw", f"`pix_fmt` must be one of {', '.join(PIX_FMTS)}, not {pix_fmt!r}")
    if width <= 0 or height <= 0:
        raise FrameError("bad_raw", "`width` and `height` must be positive")
    check_pixels(width, height, max_pixels, "frame")
    raw = fields[b"raw"]
    channels = PIX_FMTS[pix_fmt]
    if len(raw) != width * height * channels:
        raise FrameError(
            "bad_raw",
            f"`raw` has {len(raw)} bytes; {width}x{height} {pix_fmt} needs {width * height * channels}",
        )
    pixels: np.ndarray = np.frombuffer(raw, dtype=np.uint8).reshape(height, width, channels)
    if pix_fmt == "gray8":
        pixels = np.repeat(pixels, 3, axis=2)
    elif pix_fmt == "bgr24":
        pixels = np.ascontiguousarray(pixels[..., ::-1])
    return pixels, (width, height)


def decode_frame(
    fields: dict[bytes, bytes], max_pixels: int, target: InputShape | None
) -> tuple[np.ndarray, tuple[int, int]]:
    if b"image" in fields:
        return decode_image(fields[b"image"], max_pixels, target)
    return decode_raw(fields, max_pixels)


MAX_CHUNK = 16  # frames in one decode job


Decoded = tuple[np.ndarray, tuple[int, int]] | FrameError


def decode_chunk(
    fields: list[dict[bytes, bytes]], max_pixels: int, target: InputShape | None, timer: Any,
    jpegs: JpegBatchDecoder | None = None,
) -> list[Decoded]:
    """Several frames in one executor job: each frame's (array, size) or its FrameError.
    With `jpegs` (GPU decoding), the chunk's JPEGs are decoded by it in one call."""
    out: list[Decoded | None] = [None] * len(fields)
    if jpegs is not None:
        _decode_jpegs(fields, max_pixels, timer, jpegs, out)
    for k, f in enumerate(fields):
        if out[k] is not None:
            continue
        started = time.perf_counter()
        try:
            out[k] = decode_frame(f, max_pixels, target)
        except FrameError as e:
            out[k] = e
            continue
        except Exception as e:  # noqa: BLE001 - a decoder's bug: this frame's outcome, not the stage's
            out[k] = FrameError("bad_image", f"the image cannot be decoded: {e!r}")
            continue
        timer.observe(time.perf_counter() - started)
    assert all(d is not None for d in out)  # one outcome per frame: _finish pairs them in order
    return out  # type: ignore[return-value]


def _decode_jpegs(fields: list[dict[bytes, bytes]], max_pixels: int, timer: Any,
                  jpegs: JpegBatchDecoder, out: list[Decoded | None]) -> None:
    """Fill `out` for the JPEGs the batch decoder takes; the rest stay None (the CPU's)."""
    picked: list[tuple[int, tuple[int, int]]] = []
    for k, f in enumerate(fields):
        data = f.get(b"image", b"")
        if not data.startswith(MAGIC[0][0]):
            continue
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except Exception:  # noqa: BLE001 - unreadable: the CPU path says why
            continue
        if colorspace not in ("YCbCr", "Gray"):  # CMYK: the CPU path converts it
            continue
        try:
            check_pixels(width, height, max_pixels)
        except FrameError as e:
            out[k] = e
            continue
        picked.append((k, (width, height)))
    if not picked:
        return
    started = time.perf_counter()
    try:
        arrays = jpegs([fields[k][b"image"] for k, _ in picked])
    except Exception:  # noqa: BLE001 - one JPEG nvJPEG refuses fails the call: CPU for all
        return
    each = (time.perf_counter() - started) / len(picked)
    for (k, size), array in zip(picked, arrays):
        out[k] = _shown((array, size), exif.jpeg_orientation(fields[k][b"image"]))
        timer.observe(each)


def chunks(items: list[Any], parts: int) -> list[list[Any]]:
    """`items` in order, cut into at most `parts` runs of nearly equal length."""
    size = -(-len(items) // max(1, parts))
    return [items[i : i + size] for i in range(0, len(items), size)]


class Decoder:
    """Runs up to `concurrency` decode jobs at once in the shared decode executor, and passes
    frames on in the order they came: a tracking model must see a source's frames in order.

    Frames already queued are decoded in chunks (one job decodes several), cut so every
    thread gets a share: one executor hop and one loop wake-up per chunk instead of per frame,
    which is most of the loop's cost for small frames."""

    def __init__(
        self, inq: asyncio.Queue, out: asyncio.Queue, outcomes: asyncio.Queue,
        executor: Executor, metrics: Metrics, max_pixels: int,
        target: Callable[[], InputShape | None], max_age_ms: int = 0, concurrency: int = 2,
        jpegs: JpegBatchDecoder | None = None, keep_snapshot: bool = False,
    ) -> None:
        self._in, self._out, self._outcomes = inq, out, outcomes
        self._executor = executor
        self._metrics = metrics
        self._max_pixels = max_pixels
        self._target = target
        self._max_age_ms = max_age_ms
        self._concurrency = concurrency
        self._jpegs = jpegs  # decode.device on a GPU: its JPEG decoder
        self._keep_snapshot = keep_snapshot  # the live page shows the latest frames

    async def run(self) -> None:
        under_way: asyncio.Queue = asyncio.Queue(self._concurrency)  # decodes started, in order
        await asyncio.gather(self._start(under_way), self._finish(under_way))
        await self._out.put(STOP)

    async def _start(self, under_way: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        stopped = False
        while not stopped:
            first = await self._in.get()
            if first is STOP:
                break
            frames, stopped = drain_nowait(self._in, first, MAX_CHUNK * self._concurrency)
            fresh, stale = drop_stale(frames, self._max_age_ms)
            for outcome in stale:
                await self._outcomes.put(outcome)
            if not fresh:
                continue
            timer = self._metrics.decode_seconds.labels(fresh[0].pipeline)
            target = self._target()
            for part in chunks(fresh, self._concurrency):
                decoding = loop.run_in_executor(self._executor, decode_chunk, [f.fields for f in part],
                                                self._max_pixels, target, timer, self._jpegs)
                await under_way.put((part, decoding))
        await under_way.put(STOP)

    async def _finish(self, under_way: asyncio.Queue) -> None:
        while (item := await under_way.get()) is not STOP:
            frames, decoding = item
            for frame, decoded in zip(frames, await decoding):
                if isinstance(decoded, FrameError):
                    await self._outcomes.put(DeadLettered.of(frame, decoded.reason, str(decoded)))
                    continue
                frame.image, frame.orig_size = decoded
                if self._keep_snapshot:
                    frame.snapshot = frame.fields.get(b"image")  # a reference, for the live page
                frame.fields = {}  # the encoded bytes are no longer needed here: free them early
                await self._out.put(frame)
