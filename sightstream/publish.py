"""`sightstream publish`: a producer. Frames of a video file, a URL PyAV can open, or a folder
of images are XADDed as JPEG `image` fields with a `ts` (capture ms, wall clock at publication,
as a live camera would) and a `meta` naming the frame's origin.

Once Redis has answered, losing it (a restart, a failover) is waited out: the source is paused
(a file's frames are not skipped), with a line on stderr when Redis goes and when it is back.
A frame whose XADD broke off may have been written before the break: it is sent again, so it
can be in the stream twice.

It runs as its own process, so it is plain synchronous code with a synchronous Redis client.
"""

from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
from PIL import Image
from redis.exceptions import ReadOnlyError
from tqdm import tqdm

from sightstream import keys
from sightstream.errors import SightstreamError
from sightstream.redis_conn import OUTAGES, sync_client
from sightstream.stages import exif_orientation as exif
from sightstream.stages.decoder import rgb_array
from sightstream.stages.upright import upright_rgb
from sightstream.stages.video_failures import reason, unresolved

# What a folder's images may be: each is re-encoded as JPEG, so anything Pillow reads will do
# (a GIF's first frame). Other files in the folder are left alone.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class SourceError(SightstreamError):
    """A video file or URL that cannot be opened or read: the message says which and why."""


def ffmpeg_url(source: str) -> str:
    """What FFmpeg opens for `source`: a `file:` URL's path percent-decoded. FFmpeg's file
    protocol takes it literally, so `file:///srv/my%20clip.mp4` (as Path.as_uri() writes a
    path with a space) named no file."""
    if not source.lower().startswith("file:"):
        return source
    path = source[len("file:"):]
    if path.startswith("//"):  # file://host/path: the host is this one
        path = path[path.find("/", 2):] if "/" in path[2:] else ""
    return f"file:{unquote(path)}"  # a # or ? is part of the name, as FFmpeg reads it


@contextmanager
def open_video(source: str, timeout_s: float) -> Iterator[Any]:
    """The opened container. A network source that does not answer within `timeout_s` (to
    open, or to one read) raises SourceError instead of hanging the producer. Messages show the
    source without its password (a camera's rtsp://user:password@…)."""
    import av

    shown = keys.public_url(source)
    try:
        # An RTSP camera over TCP, as the daemon reads one: UDP is lost to NAT and firewalls.
        options = {"rtsp_transport": "tcp"} if source.lower().startswith(("rtsp://", "rtsps://")) else {}
        container = av.open(ffmpeg_url(source), options=options, timeout=(timeout_s, timeout_s))
    except av.error.ExitError:  # FFmpeg's interrupt callback: the timeout
        raise SourceError(f"{shown} did not answer within {timeout_s:g} s") from None
    except (av.error.FFmpegError, OSError) as e:
        raise SourceError(f"cannot open {shown}: {unresolved(source) or reason(e)}") from None
    except UnicodeDecodeError as e:
        raise SourceError(f"cannot open {shown}: {reason(e)}") from None
    with container:
        try:
            yield container
        except av.error.ExitError:
            raise SourceError(f"{shown} stopped answering (no data for {timeout_s:g} s)") from None
        except av.error.FFmpegError as e:
            raise SourceError(f"reading {shown} failed: {reason(e)}") from None


def video_frames(source: str, fps: float | None, timeout_s: float,
                 after_t: float | None = None) -> Iterator[tuple[np.ndarray, float]]:
    """(RGB frame, seconds since start) for each frame, sampled to `fps` if given (> 0).
    `after_t`: resume a video with a known length after that time (a live one, whose times
    may start again at 0 when reopened, resumes where it is now)."""
    import av

    with open_video(source, timeout_s) as container:
        if not container.streams.video:
            raise SourceError(f"{keys.public_url(source)} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        # A camera's session starts its times again at 0 (RTSP may give a duration of 0): only a
        # video of known length resumes by time, after a seek near it
        resume = after_t is not None and bool(container.duration) and not source.lower().startswith("rtsp")
        next_t = (after_t + (1 / fps if fps else 1e-3)) if resume and after_t is not None else 0.0
        if resume and after_t is not None and stream.time_base:
            try:
                container.seek(int(after_t / stream.time_base), stream=stream, backward=True)
            except av.error.FFmpegError:
                pass  # decoded from the start instead, the frames before skipped
        for frame in container.decode(stream):
            t = float(frame.time or 0.0)
            if (fps or resume) and t + 1e-6 < next_t:
                continue
            next_t = t + 1 / fps if fps else t
            yield upright_rgb(frame), t


def video_rate(source: str, timeout_s: float) -> float:
    with open_video(source, timeout_s) as container:
        if not container.streams.video:
            raise SourceError(f"{keys.public_url(source)} has no video stream")
        rate = container.streams.video[0].average_rate
        return float(rate) if rate else 25.0


def folder_frames(folder: Path, skipped: Callable[[str], None] = print) -> Iterator[tuple[np.ndarray, str]]:
    """A folder's images in name order; one that cannot be read is told to `skipped` and left
    out (a damaged file stopped the whole folder)."""
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            try:
                data = path.read_bytes()
                with Image.open(io.BytesIO(data)) as im:  # as viewers show it (a phone photo's EXIF turn)
                    rgb = exif.shown(rgb_array(im), exif.orientation(data, im))
            except (OSError, ValueError) as e:  # Pillow: UnidentifiedImageError, truncated data
                skipped(f"skipped {path.name}: it cannot be read as an image ({e})")
                continue
            yield rgb, path.name


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def publish(
    redis_url: str,
    source: str,
    stream: str,
    *,
    fps: float | None = None,
    loop: bool = False,
    maxlen: int = 0,
    quality: int = 90,
    max_frames: int = 0,
    progress: bool = True,
    cluster: bool = False,
    timeout_s: float = 10.0,
    stopping: Callable[[], bool] = lambda: False,
) -> int:
    """Publish frames; returns how many. `fps`: None = the video's own rate (a folder: as fast
    as possible); 0 = as fast as possible; F = at most F frames per second, paced in real time.
    `timeout_s`: how long a URL may take to open or to give data. `stopping()`: true once the
    caller stops (run in a thread, Ctrl-C does not reach it): a Redis outage is then not waited
    out but raised. Raises SourceError."""
    client = sync_client(redis_url, cluster=cluster, socket_timeout=10)  # a hung Redis is an outage
    folder = Path(source)
    is_folder = folder.is_dir()
    if not is_folder and "://" not in source and not folder.is_file():
        raise FileNotFoundError(f"{source}: no such video file or folder")
    rate = fps if fps is not None else (0.0 if is_folder else video_rate(source, timeout_s))
    sent = 0
    # none when quiet: a disabled tqdm still has a __del__ that a Ctrl-C could land in (a traceback)
    bar = tqdm(total=max_frames or None, unit="frame", desc=f"publish {stream}") if progress else None
    started = time.monotonic()

    def say(line: str) -> None:
        (bar.write if bar is not None else print)(f"sightstream: {line}", file=sys.stderr)

    waited = False  # an outage was waited out since the video was opened

    def send(fields: dict[Any, Any]) -> float:
        """XADD, waiting out a Redis outage once Redis has answered; returns the seconds waited."""
        nonlocal waited
        down_since, backoff_s = 0.0, 0.0
        while True:
            fields["ts"] = str(time.time_ns() // 1_000_000)  # a live camera's capture time: when sent
            try:
                client.xadd(stream, fields, maxlen=maxlen or None, approximate=True)
            except (*OUTAGES, ReadOnlyError) as e:  # READONLY: a failover demoted the node the URL names
                if not sent or stopping():  # never answered: the URL is wrong or Redis is not up
                    raise
                if not down_since:
                    down_since = time.monotonic()
                    what = "takes no writes (a replica now: a failover?)" if isinstance(e, ReadOnlyError) \
                        else "unreachable"
                    say(f"Redis {what} ({e or type(e).__name__}); waiting for it, the source paused")
                backoff_s = min(5.0, backoff_s * 2 or 0.5)
                time.sleep(backoff_s)
                continue
            if not down_since:
                return 0.0
            say("Redis is back; publishing again")
            waited = True
            return time.monotonic() - down_since

    def read(after_t: float | None) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
        """The source's frames, each with its origin; a URL that fails after an outage was
        waited out (a camera or server that gave up on a reader paused that long) is opened
        again, once per outage, resuming after the last frame sent."""
        nonlocal waited
        if is_folder:
            yield from ((rgb, {"file": name}) for rgb, name in folder_frames(folder, say))
            return
        while True:
            waited = False
            try:
                for rgb, t in video_frames(source, fps or None, timeout_s, after_t):
                    after_t = t
                    yield rgb, {"t": round(t, 3)}
                return
            except SourceError as e:
                if not waited or "://" not in source:
                    raise
                say(f"{e} while Redis was away; opening it again")

    try:
        while True:
            before = sent
            for rgb, origin in read(None):
                if rate:
                    wait = started + sent / rate - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                fields: dict[Any, Any] = {  # redis-py wants its own key and value types
                    "image": encode_jpeg(rgb, quality),
                    "meta": json.dumps({"index": sent, **origin}),
                }
                started += send(fields)  # paced on from where it was, not in a burst to catch up
                sent += 1
                if bar is not None:
                    bar.update(1)
                if max_frames and sent >= max_frames:
                    return sent
            if sent == before:  # nothing in it (and --loop would go round an empty source for ever)
                raise SourceError(f"{source} holds no image that can be read" if is_folder else
                                  f"{keys.public_url(source)} gave no frame: it is not a video that can "
                                  "be decoded (damaged, or cut short?)")
            if not loop:
                return sent
    except SourceError as e:  # what was sent before it stays sent: say how much
        if sent:
            raise SourceError(f"{e} (after {sent} frame{'' if sent == 1 else 's'} were published to "
                              f"{stream})") from None
        raise
    finally:
        if bar is not None:
            bar.close()
        client.close()


def make_sample_video(
    path: Path, seconds: float = 6.0, fps: int = 10, size: tuple[int, int] = (1280, 720)
) -> Path:
    """A short H.264 clip made here, no download: a slow pan and zoom across the astronaut
    photograph (NASA, public domain) shipped in the package, so the face model has a face."""
    import av

    photo = Image.open(Path(__file__).parent / "data" / "astronaut.jpg").convert("RGB")
    w, h = size
    frames = int(seconds * fps)
    # faststart: the index (moov) first, so the clip also plays from a server without Range support
    with av.open(str(path), "w", options={"movflags": "+faststart"}) as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            k = i / max(1, frames - 1)
            canvas = Image.new("RGB", size, (40, 44, 52))
            side = int(h * (0.55 + 0.35 * k))  # the photo grows as the "camera" zooms in
            im = photo.resize((side, side))
            x = int((w - side) * (0.1 + 0.8 * k))
            canvas.paste(im, (x, (h - side) // 2))
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(canvas), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path
