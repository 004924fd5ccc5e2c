"""Video fixtures made here with PyAV (no ffmpeg binary, no network): H.264 clips, HLS VOD
folders, and HTTP servers on 127.0.0.1 in their own thread: a static one (VOD, MP4) and a live
HLS one whose sliding-window playlist advances with wall time and can be told to stall, 404 or end.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import av
import numpy as np
from aiohttp import web

from tests.loop_thread import LoopThread

SIZE = (160, 120)


def pattern(i: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    """Frame i: a flat colour that changes with i and a bright column that walks across, so two
    frames differ visibly and a decoded frame can be told apart from its neighbours."""
    w, h = size
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0] = (i * 7) % 256
    image[..., 2] = 255 - (i * 3) % 256
    image[:, (i * 3) % w, 1] = 255
    return image


def _encode(
    path: Path, seconds: float, fps: int, size: tuple[int, int], gop: int | None,
    fmt: str | None = None, options: dict[str, str] | None = None, preset: str = "ultrafast",
) -> Path:
    gop = gop or fps
    # keyint_min = gop and no scenecut: keyframes exactly every `gop` frames, so HLS segments
    # cut on time and the tests can count keyframes.
    x264 = {"preset": preset, "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
    with av.open(str(path), "w", format=fmt, options=options or {}) as out:
        stream = out.add_stream("libx264", rate=fps, options=x264)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(round(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(pattern(i, size), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def make_damaged_clip(path: Path) -> Path:
    """An MP4 whose index says no duration and whose pictures are gone: FFmpeg opens it, finds
    no length (as for a live stream) and decodes nothing."""
    import struct

    data = bytearray(make_clip(path, seconds=3, fps=10).read_bytes())
    for box, offset in ((b"mvhd", 16), (b"tkhd", 20), (b"mdhd", 16)):  # version-0 boxes' durations
        at = data.find(box)
        while at != -1:
            if data[at + 4] == 0:
                data[at + 4 + offset:at + 8 + offset] = bytes(4)
            at = data.find(box, at + 1)
    mdat = data.find(b"mdat")
    size = struct.unpack(">I", data[mdat - 4:mdat])[0]
    data[mdat + 4:mdat - 4 + size] = bytes(size - 8)
    path.write_bytes(bytes(data))
    return path


def damage(path: Path, at: float, size: int, seed: int = 1) -> Path:
    """Overwrite `size` bytes at `at` (a fraction of the file) with noise: a file damaged in
    the middle (its index and the rest of its pictures whole)."""
    import random

    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    noise = random.Random(seed)
    data[start:start + size] = bytes(noise.randrange(256) for _ in range(size))
    path.write_bytes(bytes(data))
    return path


def make_clip(path: Path, seconds: float, fps: int, size: tuple[int, int] = SIZE, gop: int | None = None,
              preset: str = "ultrafast") -> Path:
    """An H.264 MP4 (yuv420p), a keyframe every `gop` frames (default: every second); x264's
    `preset` "medium" makes B-frames (decoded out of order), "ultrafast" none."""
    return _encode(path, seconds, fps, size, gop, preset=preset)


def make_portrait_clip(path: Path, seconds: float, fps: int) -> Path:
    """A clip as phones record portrait video: landscape pictures (SIZE) and a display matrix
    in the MP4's track header that says to turn them a quarter turn clockwise."""
    import struct

    data = bytearray(make_clip(path, seconds, fps).read_bytes())
    at = data.find(b"tkhd")
    assert data[at + 4] == 0  # version 0: flags, times, ids, duration (24 bytes), 8 reserved, layer…volume (8)
    matrix = at + 4 + 4 + 20 + 8 + 8
    data[matrix:matrix + 36] = struct.pack(">9I", 0, 0x10000, 0, 0xFFFF0000, 0, 0, 0, 0, 0x40000000)
    path.write_bytes(bytes(data))
    return path


def make_hls_vod(
    folder: Path, seconds: float, fps: int, segment_s: float = 1, size: tuple[int, int] = SIZE,
    gop: int | None = None,
) -> Path:
    """`folder/index.m3u8` (a VOD playlist with EXT-X-ENDLIST) and its MPEG-TS segments, which
    PyAV's hls muxer names index0.ts, index1.ts, …; returns the playlist's path."""
    folder.mkdir(parents=True, exist_ok=True)
    options = {"hls_time": str(segment_s), "hls_playlist_type": "vod", "hls_list_size": "0"}
    return _encode(folder / "index.m3u8", seconds, fps, size, gop or round(fps * segment_s), "hls", options)


def segments(playlist: Path) -> list[tuple[float, str]]:
    """(duration, file name) of each segment of a playlist the hls muxer wrote."""
    lines = playlist.read_text().splitlines()
    return [
        (float(m.group(1)), lines[n + 1])
        for n, line in enumerate(lines)
        if (m := re.match(r"#EXTINF:([\d.]+),", line))
    ]


class ThreadServer:
    """An aiohttp app served on a free port of 127.0.0.1 by its own event loop in its own
    thread, so a test's loop (or a blocking PyAV read) never serves or starves it."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.port = 0
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
        self._loop = LoopThread("test-http")

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def call(self, fn, *args):
        """Run `fn(*args)` on the server's loop (its state is only touched there) and wait."""
        async def run():
            return fn(*args)
        return self._loop.run(run, 5)

    def __enter__(self) -> ThreadServer:
        self._loop.start()

        async def start() -> int:
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            return self._runner.addresses[0][1]

        self.port = self._loop.run(start)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.close(self._runner.cleanup)  # then handlers of clients that left (a hung request)


@contextmanager
def static_server(folder: Path, hang_once: Iterable[str] = ()) -> Iterator[ThreadServer]:
    """Serves the files of `folder` (MP4 clips, VOD playlists and segments). The first request
    for each path in `hang_once` (relative to `folder`) never gets an answer."""
    pending = set(hang_once)

    @web.middleware
    async def hang(request: web.Request, handler):
        if request.path.lstrip("/") in pending:
            pending.discard(request.path.lstrip("/"))
            await asyncio.sleep(3600)  # cancelled when the server shuts down
        return await handler(request)

    app = web.Application(middlewares=[hang])
    app.router.add_static("/", folder)
    with ThreadServer(app) as server:
        yield server


class LiveHLS:
    """A live HLS source made of pre-generated segments: a sliding window of `window` segments,
    no EXT-X-ENDLIST, EXT-X-MEDIA-SEQUENCE advancing one segment per segment duration of wall
    time. `stall()` stops advancing and (by default) hangs every request until `resume()`;
    `not_found()` answers 404 to everything; `end()` appends EXT-X-ENDLIST and stops advancing;
    segments named in `lost` (set it before serving) answer 404.
    Its state lives on the server's loop: change it only through these methods."""

    def __init__(self, playlist: Path, window: int = 3) -> None:
        self.folder = playlist.parent
        self.segments = segments(playlist)
        self.target_s = max(1, round(max(d for d, _ in self.segments)))
        self.window = window
        self.requests = 0
        self._started = time.monotonic()
        self._frozen: int | None = None  # segments published, while not advancing
        self._ended = False
        self._missing = False
        self.lost: set[str] = set()  # segments that answer 404 (a packager that lost them)
        self._released = asyncio.Event()  # cleared: requests hang (bound to the server's loop on first use)
        self._released.set()
        self._server: ThreadServer | None = None

    def published(self) -> int:
        """Segments published so far: the first window at once, then one per target duration."""
        if self._frozen is not None:
            return self._frozen
        grown = self.window + int((time.monotonic() - self._started) / self.target_s)
        return min(len(self.segments), grown)

    def playlist(self) -> str:
        end = self.published()
        first = max(0, end - self.window)
        lines = [
            "#EXTM3U", "#EXT-X-VERSION:3", f"#EXT-X-TARGETDURATION:{self.target_s}",
            f"#EXT-X-MEDIA-SEQUENCE:{first}",
        ]
        for duration, name in self.segments[first:end]:
            lines += [f"#EXTINF:{duration:.6f},", name]
        if self._ended:
            lines.append("#EXT-X-ENDLIST")
        return "\n".join(lines) + "\n"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        await self._released.wait()
        if self._missing:
            raise web.HTTPNotFound()
        name = request.match_info["name"]
        if name == "live.m3u8":
            return web.Response(text=self.playlist(), content_type="application/vnd.apple.mpegurl")
        names = [n for _, n in self.segments[: self.published()]]
        if name not in names or name in self.lost:
            raise web.HTTPNotFound()
        return web.FileResponse(self.folder / name)

    def _freeze(self) -> None:
        self._frozen = self.published()

    def _stall(self, hang: bool) -> None:
        self._freeze()
        if hang:
            self._released.clear()

    def _resume(self) -> None:
        # The window goes on from where it stood: as an encoder that was cut off, then came back.
        assert self._frozen is not None
        self._started = time.monotonic() - (self._frozen - self.window) * self.target_s
        self._frozen = None
        self._released.set()

    def _end(self) -> None:
        self._freeze()
        self._ended = True

    def _not_found(self, missing: bool) -> None:
        self._missing = missing
        self._released.set()

    def stall(self, hang: bool = True) -> None:
        self._call(self._stall, hang)

    def resume(self) -> None:
        self._call(self._resume)

    def end(self) -> None:
        self._call(self._end)

    def not_found(self, missing: bool = True) -> None:
        """Answer 404 to everything (False: answer again, as a packager back from a restart)."""
        self._call(self._not_found, missing)

    def _call(self, fn, *args) -> None:
        assert self._server is not None, "use `with live_hls(...)`"
        self._server.call(fn, *args)

    @property
    def url(self) -> str:
        assert self._server is not None
        return self._server.url("live.m3u8")


@contextmanager
def live_hls(playlist: Path, window: int = 3) -> Iterator[LiveHLS]:
    """A LiveHLS served on 127.0.0.1 (see LiveHLS) from the segments next to `playlist`."""
    live = LiveHLS(playlist, window)
    app = web.Application()
    app.router.add_get("/{name}", live._handle)
    with ThreadServer(app) as server:
        live._server = server
        live._started = time.monotonic()  # the first window is published now
        yield live


def column(image: np.ndarray) -> int:
    """Where frame i's bright column is: (i * 3) % width, whatever the codec did to the colours."""
    return int(np.argmax(image[..., 1].mean(axis=0)))
