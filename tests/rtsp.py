"""A tiny RTSP camera for the tests (no network, no media server): H.264 made here with PyAV,
sent as RTP interleaved in the RTSP connection (TCP), as an IP camera does when asked for TCP.

It answers OPTIONS, DESCRIBE (an SDP with one H.264 track, parameter sets in-band), SETUP,
PLAY and TEARDOWN, then streams its clip in a loop in real time, with RTP timestamps starting
at 0 in each session (as a camera's start anywhere: a client must not rely on them across
sessions). `drop()` cuts every session, as a camera that reboots does.
"""

from __future__ import annotations

import asyncio
import io
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager

import av
import numpy as np

from tests.loop_thread import LoopThread

SDP = ("v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=camera\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\n"
       "m=video 0 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\na=fmtp:96 packetization-mode=1\r\n"
       "a=control:track1\r\n")
MTU = 1200


def access_units(seconds: float, fps: int, size: tuple[int, int] = (320, 240)) -> list[list[bytes]]:
    """An H.264 clip (a bar that moves right, SPS/PPS before each keyframe), as one list of
    NAL units per frame."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="h264") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.options = {"x264-params": f"repeat-headers=1:keyint={fps}:bframes=0", "tune": "zerolatency"}
        for i in range(int(seconds * fps)):
            image = np.zeros((size[1], size[0], 3), np.uint8)
            image[:, : (i * 7) % size[0] + 1] = (200, 50, 50)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    data = buffer.getvalue()
    starts = []
    at = data.find(b"\x00\x00\x01")
    while at >= 0:
        starts.append(at + 3)
        at = data.find(b"\x00\x00\x01", at + 3)
    nals = [data[a : b - 3].rstrip(b"\x00") for a, b in zip(starts, [*starts[1:], len(data) + 3])]
    units, current = [], []
    for nal in nals:
        current.append(nal)
        if nal[0] & 0x1F in (1, 5):  # a slice ends the frame (one slice per frame)
            units.append(current)
            current = []
    return units


def rtp_packets(unit: list[bytes], seq: int, timestamp: int) -> tuple[list[bytes], int]:
    """One frame's RTP packets (single NAL units, or FU-A fragments past the MTU), the marker
    bit on its last; and the next sequence number."""
    bodies: list[tuple[bytes, bool]] = []
    for n, nal in enumerate(unit):
        last = n == len(unit) - 1
        if len(nal) <= MTU:
            bodies.append((nal, last))
            continue
        header, rest, first = nal[0], nal[1:], True
        while rest:
            chunk, rest = rest[:MTU], rest[MTU:]
            fu = (0x80 if first else 0) | (0x40 if not rest else 0) | (header & 0x1F)
            bodies.append((bytes([(header & 0xE0) | 28, fu]) + chunk, last and not rest))
            first = False
    packets = []
    for body, marker in bodies:
        packets.append(struct.pack("!BBHII", 0x80, (0x80 if marker else 0) | 96, seq & 0xFFFF,
                                   timestamp & 0xFFFFFFFF, 0x5EED) + body)
        seq += 1
    return packets, seq


class RtspCamera:
    """The camera, served on a free port of 127.0.0.1 by its own event loop in its own thread."""

    def __init__(self, seconds: float = 2, fps: int = 10) -> None:
        self.units = access_units(seconds, fps)
        self.fps = fps
        self.port = 0
        self.sessions = 0  # PLAYs answered
        self._loop = LoopThread("test-rtsp")
        self._writers: set[asyncio.StreamWriter] = set()

    def url(self, path: str = "camera", user: str = "") -> str:
        return f"rtsp://{user + '@' if user else ''}127.0.0.1:{self.port}/{path}"

    def drop(self) -> None:
        """Cut every session (a camera rebooting)."""
        def cut() -> None:
            for writer in list(self._writers):
                writer.transport.abort()
        self._loop.loop.call_soon_threadsafe(cut)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        playing: asyncio.Task | None = None
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
                lines = head.split("\r\n")
                method, url, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:]) if v}
                if "content-length" in headers:
                    await reader.readexactly(int(headers["content-length"]))
                extra, body = "", ""
                if method == "OPTIONS":
                    extra = "Public: OPTIONS, DESCRIBE, SETUP, PLAY, TEARDOWN\r\n"
                elif method == "DESCRIBE":
                    body = SDP
                    extra = (f"Content-Base: {url}/\r\nContent-Type: application/sdp\r\n"
                             f"Content-Length: {len(body)}\r\n")
                elif method == "SETUP":
                    extra = "Transport: RTP/AVP/TCP;unicast;interleaved=0-1\r\nSession: 5EED\r\n"
                elif method == "PLAY":
                    extra = "Session: 5EED\r\nRange: npt=0.000-\r\n"
                writer.write(f"RTSP/1.0 200 OK\r\nCSeq: {headers.get('cseq', '0')}\r\n{extra}\r\n{body}".encode())
                await writer.drain()
                if method == "TEARDOWN":
                    break
                if method == "PLAY" and playing is None:
                    self.sessions += 1
                    playing = asyncio.create_task(self._stream(writer))
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, asyncio.CancelledError):
            pass  # the client left, or the camera is shutting down
        finally:
            self._writers.discard(writer)
            if playing is not None:
                playing.cancel()
            writer.close()

    async def _stream(self, writer: asyncio.StreamWriter) -> None:
        seq, k, started = 0, 0, time.monotonic()
        while not writer.is_closing():
            packets, seq = rtp_packets(self.units[k % len(self.units)], seq, int(k * 90_000 / self.fps))
            for packet in packets:
                writer.write(b"$\x00" + struct.pack("!H", len(packet)) + packet)
            await writer.drain()
            k += 1
            await asyncio.sleep(max(0.0, started + k / self.fps - time.monotonic()))

    def __enter__(self) -> RtspCamera:
        self._loop.start()

        async def start() -> int:
            self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
            return self._server.sockets[0].getsockname()[1]

        self.port = self._loop.run(start)
        return self

    def __exit__(self, *exc: object) -> None:
        async def cut() -> None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()

        self._loop.close(cut)  # then the sessions' tasks


@contextmanager
def rtsp_camera(seconds: float = 2, fps: int = 10) -> Iterator[RtspCamera]:
    with RtspCamera(seconds, fps) as camera:
        yield camera
