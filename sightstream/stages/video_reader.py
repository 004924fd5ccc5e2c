"""Reading the frames of one video source (a file, an HTTP video, a live or VOD HLS playlist,
an RTSP camera) with PyAV in a thread of its own, handed to the event loop with backpressure.

An RTSP camera is read over TCP (RTP interleaved in the RTSP connection: UDP is lost to NAT
and firewalls). Its timestamps start again at each session, so after a reopen the frames go on
just after the last one, as a live HLS stream's would.

A stalled or dead source blocks only its own thread. Around the blocking read runs a reopen
loop (capped exponential back-off with jitter, reset after a healthy period) and a watchdog
that reopens a source with no video data for `stall_s`. Positions are stream time (PTS), so a
reopened or resumed read goes on after the last frame it yielded, at the same frame indices.

FFmpeg blocks in network reads with one way in from another thread: the container's interrupt
callback, which PyAV drives from a timeout it alone arms. Our watchdog and stop() speak through
it (stages/video_interrupt.py), so stop() ends even a read of a hung server at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import math
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

import av
import av.container.core
import numpy as np

from sightstream import keys, log
from sightstream.errors import SightstreamError
from sightstream.stages.confined_files import ConfinedFiles, OutsideAllowedPaths
from sightstream.stages.flow import worth_logging
from sightstream.stages.upright import upright_rgb
from sightstream.stages.video_failures import (
    empty_file,
    index_at_end_hint,
    reason,
    redirect_target,
    unresolved,
)
from sightstream.stages.video_interrupt import Guard, guards

_log = log.get(__name__)

# PyAV routes FFmpeg's logs through Python, which can deadlock with reader threads (PyAV #751).
av.logging.set_level(None)

DISCONTINUITY_S: Final = 60.0  # a live PTS this far behind the last one: the encoder restarted
LIVE_STOPPED: Final = "the live stream stopped"  # ended or failing: a reopen tells which
RECOVERED_S: Final = 2.0  # of new live video in one attempt: its back-off starts again
LIVE_GAP_MARGIN_S: Final = 10.0  # a live jump counts at most the wall time since the last packet + this
MAX_REFUSED_PACKETS: Final = 250  # in a row (10 s at 25 fps): a video that cannot be decoded, not damage
GAP_S: Final = 0.5  # an HLS VOD jumping this far ahead: a segment was skipped (not a frame rate)
_PERMANENT = (  # retrying will not help: fail after `max_open_failures` of these in a row
    av.error.HTTPBadRequestError, av.error.HTTPUnauthorizedError, av.error.HTTPForbiddenError,
    av.error.HTTPNotFoundError, av.error.HTTPOtherClientError, FileNotFoundError, PermissionError,
    IsADirectoryError, av.error.InvalidDataError, av.error.ProtocolNotFoundError,
    av.error.DemuxerNotFoundError, av.error.DecoderNotFoundError,
    UnicodeDecodeError,  # PyAV reading a damaged file's metadata as text
)
# Containers not read as live: an MP4 (or MOV) with no duration is damaged (its index, the moov
# box, is broken) far more often than a live stream sent as one endless fragmented MP4 (live
# sources come as HLS, RTSP or MPEG-TS).
NEVER_LIVE_FORMATS = {"mov,mp4,m4a,3gp,3g2,mj2"}


# The demuxers an API job's file may be read with: video containers and streams, and HLS
# (whose segments go through the confined opener). Not concat (an ffconcat list, whatever the
# file's name, opens the files it lists itself, past the opener), nor DASH or IMF.
CONFINED_FORMATS = ",".join((
    "mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "mpegts", "mpeg", "hls", "avi", "flv", "asf", "ogg",
    "h264", "hevc", "m4v", "mjpeg", "mxf", "nut", "dv", "gif", "yuv4mpegpipe", "image2",
    "jpeg_pipe", "png_pipe", "webp_pipe", "bmp_pipe",
    "aac", "mp3", "ac3", "eac3", "webvtt"))  # an HLS playlist's audio and subtitle renditions


class VideoSourceError(SightstreamError):
    """A video source cannot be read and retrying will not help (its one sentence says why)."""


@dataclass(frozen=True)
class ReaderOptions:
    fps: float = 0.0  # 0: every frame; else the first frame of each 1/fps of presentation time
    open_timeout_s: float = 10.0
    # One demux call, which for live HLS includes waiting for the next segment: 2-3x its target.
    read_timeout_s: float = 10.0
    stall_s: float = 20.0  # no video data for this long: close and reopen
    max_backoff_s: float = 30.0
    healthy_s: float = 30.0  # frames for this long after an open reset the back-off
    keyframes_only: bool | None = None  # None: when keyframes come at least twice per 1/fps
    max_pixels: int = 40_000_000
    headers: Mapping[str, str] = field(default_factory=dict)  # HTTP(S), HLS segment fetches too
    live_start_index: int = -3  # live HLS starts this many segments back from the live edge
    seg_max_retry: int = 3
    m3u8_hold_counters: int | None = None  # playlist reloads with no new segment (FFmpeg: 1000)
    reconnect_delay_max_s: int = 5  # HTTP reconnects inside one open (not HLS segments)
    max_open_failures: int = 3  # permanent open errors (404, no such file, not a video) in a row
    max_vod_failures: int = 8  # transient errors in a row for a VOD; a live source retries forever
    queue_size: int = 4  # frames decoded ahead of the consumer
    # > 0: each frame also comes as a copy at most this many pixels on its longer side (a live
    # page's tile: kept per source, where a 4K frame would be 25 MB), made in the reader's thread
    thumbnail_side: int = 0
    # An API job's file: every file FFmpeg opens for it must be under these folders (resolved),
    # checked on the file opened (stages/confined_files.py). Empty: not confined.
    confine_to: tuple[str, ...] = ()
    # False: an HTTP redirect fails the open (FFmpeg's max_redirects=0): an API job's URL checked
    # against jobs.allowed_hosts must not lead to a host nobody checked.
    follow_redirects: bool = True


@dataclass(frozen=True)
class VideoFrame:
    index: int  # round(pts_s * average frame rate): the same frame gets it on every read
    pts_s: float  # presentation time in seconds since the origin (the stream's start)
    image: np.ndarray  # RGB, HxWx3 uint8
    keyframe: bool
    thumbnail: np.ndarray | None = None  # see ReaderOptions.thumbnail_side


@dataclass
class ReaderStats:
    """Written by the reader thread, read by anyone: plain numbers, a torn read is harmless."""

    open_s: float = 0.0  # spent opening (connecting, playlists, probing)
    decode_s: float = 0.0  # spent demuxing, decoding, converting; not waiting for the consumer
    decoded: int = 0
    kept: int = 0
    reopens: int = 0
    last_error: str | None = None
    position_s: float | None = None  # pts_s of the last frame decoded
    duration_s: float | None = None  # None: live (or not opened yet)
    is_live: bool | None = None  # None: not opened yet
    keyframes_only: bool = False
    origin_s: float | None = None  # the stream time pts_s counts from (to resume a live read)
    skipped_s: float = 0.0  # video the demuxer jumped over (an HLS segment it could not fetch)


def container_options(url: str, o: ReaderOptions) -> dict[str, str]:
    """Demuxer and protocol options. Only `rw_timeout` and `headers` reach HLS segment fetches:
    `reconnect*` covers the first open, our reopen loop the rest. Never `reconnect_at_eof`:
    with HLS it reconnects forever."""
    opts = {"live_start_index": str(o.live_start_index), "seg_max_retry": str(o.seg_max_retry)}
    if o.m3u8_hold_counters is not None:
        opts["m3u8_hold_counters"] = str(o.m3u8_hold_counters)
    if o.confine_to:  # an API job's file: no demuxer that opens the files it names on its own
        opts["format_whitelist"] = CONFINED_FORMATS
    scheme = urlsplit(url).scheme
    if scheme in ("rtsp", "rtsps"):
        return {"rtsp_transport": "tcp"}
    if scheme in ("http", "https"):
        opts |= {
            "rw_timeout": str(int(o.read_timeout_s * 1_000_000)), "reconnect": "1",
            "reconnect_streamed": "1", "reconnect_delay_max": str(o.reconnect_delay_max_s),
            # A playlist from the network may name only network segments: never the host's files.
            "protocol_whitelist": "http,https,tcp,tls,crypto",
        }
        if not o.follow_redirects:
            opts["max_redirects"] = "0"
        if o.headers:
            opts["headers"] = "".join(f"{k}: {v}\r\n" for k, v in o.headers.items())
    return opts


class _Keyframes:
    """Whether to decode keyframes only: when they come at least twice per sampling period,
    every period still gets a frame. Known up front from an index (MP4), else learnt from the
    first gaps between keyframe packets; in auto mode one gap too long turns it off for good.
    The decoder is switched only at a keyframe, where it has no references to lose."""

    GAPS = 3

    def __init__(self, forced: bool | None, fps: float) -> None:
        self.auto = forced is None and fps > 0
        self.on: bool | None = forced if forced is not None else (None if fps > 0 else False)
        self._longest = 1 / (2 * fps) + 1e-6 if fps > 0 else 0.0
        self._last_key: float | None = None
        self._good_gaps = 0

    def reopened(self) -> None:
        self._last_key = None  # the gap across an outage or a seek is no keyframe interval

    def from_index(self, stream: Any, end_s: float) -> None:
        """`end_s`: where the stream ends, in stream time (the last GOP counts too)."""
        if self.auto and self.on is None:
            keys = [float(e.timestamp * stream.time_base) for e in stream.index_entries if e.is_keyframe]
            if len(keys) >= 2:
                self.on = max(b - a for a, b in itertools.pairwise([*keys, end_s])) <= self._longest

    def packet(self, t: float, key: bool) -> None:
        if not self.auto or self.on is False:
            return
        if self._last_key is not None and t - self._last_key > self._longest:
            self.on = False
        elif key:
            if self._last_key is not None and t > self._last_key:
                self._good_gaps += 1
                if self._good_gaps >= self.GAPS and self.on is None:
                    self.on = True
            self._last_key = t


class _OpenFailed(Exception):
    def __init__(self, error: BaseException, url: str, live: bool, was_live: bool,
                 redirected_to: str | None = None) -> None:
        # A host with no address: a typo more often than an outage, so retrying gives up soon;
        # but a live source (a camera whose name goes with it while it reboots) keeps trying.
        # A refusal (404, 403, …) is final too, but not from a source already read live: a
        # packager restarting answers 404 for a while.
        dns = unresolved(url) if isinstance(error, (av.error.FFmpegError, OSError)) else None
        redirected = f"it redirects to {keys.public_url(redirected_to)}, and with jobs.allowed_hosts set " \
            "redirects are not followed (where they lead is not checked): give the URL it leads to" \
            if redirected_to else None
        empty = "the file is empty (0 bytes)" if empty_file(url) else None
        super().__init__(dns or redirected or empty or reason(error))
        self.permanent = (dns is not None and not live) or redirected is not None or empty is not None or (
            isinstance(error, _PERMANENT) and not was_live)


class _Reader:
    """The blocking side, run by the source's thread: open, read, sample, reopen."""

    def __init__(
        self, url: str, options: ReaderOptions, stats: ReaderStats, stop: threading.Event,
        emit: Callable[[VideoFrame], bool],
    ) -> None:
        self.url, self.o, self.stats, self.stop, self.emit = url, options, stats, stop, emit
        self.name = keys.public_url(url)
        self.guard = Guard(stop, options.stall_s)
        self.keyframes = _Keyframes(options.keyframes_only, options.fps)
        self.t0: float | None = None  # the origin, in stream time
        self.rate = 0.0  # frames per second for indices, from the first open
        self.opened_at = self.clock = 0.0
        self.down_since: float | None = None  # since the first failure not followed by a frame
        self.progressed = False  # this open decoded a frame
        self.last_pts: float | None = None  # the resume point: no frame at or before it again
        self.seen: float | None = None  # the latest pts_s decoded, kept or not
        self.last_bucket = -math.inf
        self.last_index = -1
        self.read_to = -math.inf  # how far packets reached (pts + duration), from t0
        self.end_s: float | None = None  # where a VOD ends, from t0
        self._local = False  # a file on this machine (not a playlist): read again, it says the same
        self.failures = 0
        # Where an HLS read's packets ended (stream time), kept across reopens: a live stream
        # reopened at its live edge skipped what came meanwhile, and was not said to
        self.hls_ended: float | None = None  # the furthest any HLS packet reached
        self.hls_packet_at: float | None = None  # when the last HLS packet came (monotonic)
        # Timestamps start again with each session (RTSP): a reopen goes on after the last frame.
        self.sessions = urlsplit(url).scheme in ("rtsp", "rtsps")

    def run(self, after_s: float | None, origin_s: float | None) -> None:
        """Read until the source ends or stop is set; VideoSourceError when giving up."""
        self.t0 = origin_s
        if after_s is not None:
            self.last_pts, self.last_bucket = after_s, self._bucket(after_s)
            if origin_s is not None:  # resumed (another daemon, a restart): what follows the last result
                self.hls_ended = origin_s + after_s + (1 / self.o.fps if self.o.fps > 0 else 0.0)
        refused = 0
        guards[threading.get_ident()] = self.guard
        try:
            for attempt in itertools.count():
                if self.stop.is_set():
                    return
                self.stats.reopens += attempt > 0
                seen_before = self.seen
                try:
                    why = self._attempt()
                    refused = 0
                except _OpenFailed as e:
                    why = self.guard.fired or str(e)
                    refused = refused + 1 if e.permanent else 0
                    if refused >= self.o.max_open_failures:
                        raise VideoSourceError(
                            f"the video source {self.name} cannot be opened: {why} ({refused} attempts)"
                        ) from None
                except (av.error.FFmpegError, OSError) as e:
                    why = self.guard.fired or reason(e)
                    # A video that is not live whose data cannot be decoded (damaged) does not
                    # mend on a retry: it fails as one that cannot be opened does.
                    damaged = isinstance(e, av.error.InvalidDataError) and not self._live()
                    refused = refused + 1 if damaged and not self.progressed else 0
                    if refused >= self.o.max_open_failures:
                        raise VideoSourceError(
                            f"the video source {self.name} cannot be read (damaged?): {why} "
                            f"({refused} attempts){index_at_end_hint(self.url)}") from None
                except OutsideAllowedPaths as e:  # the file, or one a playlist names; no retry mends it
                    raise VideoSourceError(f"the video source {self.name} cannot be read: {e}") from None
                if why is None or why == "stop" or self.stop.is_set():
                    return
                if self._recovered(seen_before):
                    self.failures = 0
                self._failed(why)
        finally:
            guards.pop(threading.get_ident(), None)

    def _recovered(self, seen_before: float | None) -> bool:
        """A live source that gave RECOVERED_S of new video in the attempt that just ended: its
        next failure is a new outage, retried soon (a live stream's end waited out the back-off
        its outage before had grown to: 18 s). Not a VOD: one that fails at the same place
        after re-reading up to it would be retried for ever; nor a camera that gives a frame
        and drops: it keeps its back-off."""
        if not self._live() or self.seen is None:
            return False
        return seen_before is None or self.seen - seen_before >= RECOVERED_S

    def _failed(self, why: str) -> None:
        why = f"no frame for {self.o.stall_s:g} s" if why == "stall" else why
        self.failures += 1
        self.stats.last_error = why
        if not self._live() and self.failures >= self.o.max_vod_failures:
            raise VideoSourceError(
                f"the video source {self.name} keeps failing: {why} ({self.failures} attempts)"
            )
        delay = min(self.o.max_backoff_s, 0.5 * 2 ** min(self.failures - 1, 16)) * random.uniform(0.5, 1.0)
        # Each outage's first failure is logged (also one soon after the last came back: the
        # failure count resets only after healthy_s of frames), then every 30th.
        if self.down_since is None or worth_logging(self.failures):
            _log.warning("video_source_failed", source=self.name, error=why, failures=self.failures,
                         retry_in_s=round(delay, 2))
        if self.down_since is None:
            self.down_since = time.monotonic()
        self.stop.wait(delay)

    def _live(self) -> bool:
        """Whether the source is live: as its last open found, else guessed from the URL."""
        if self.stats.is_live is None:
            return self.sessions or urlsplit(self.url).path.endswith(".m3u8")
        return bool(self.stats.is_live)

    def _attempt(self) -> str | None:
        """One open and read. None: the source ended (or stop); else why it must be reopened."""
        self.progressed = False
        files = ConfinedFiles(self.o.confine_to) if self.o.confine_to else None
        try:
            return self._open_and_read(files)
        finally:
            if files is not None:
                files.close()

    def _open_and_read(self, files: ConfinedFiles | None) -> str | None:
        self.guard.arm(watching=False)
        started = time.perf_counter()
        try:
            container = av.open(
                self.url, container_options=container_options(self.url, self.o),
                timeout=(self.o.open_timeout_s, self.o.read_timeout_s),
                io_open=files,
            )
        except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
            # FFmpeg tells a redirect it may not follow only as an I/O error: asked to be sure
            refused = not self.o.follow_redirects and isinstance(e, OSError) and e.errno == errno.EIO \
                and self.url.lower().startswith(("http://", "https://"))
            target = redirect_target(self.url, self.o.headers, self.o.open_timeout_s) if refused else None
            if self.o.confine_to and isinstance(e, av.error.ArgumentError):  # format_whitelist's refusal
                raise VideoSourceError(
                    f"the video source {self.name} cannot be read: it is not a video format a job may "
                    "read from a file (a concat list, or another file that names files to read, is refused)"
                ) from e
            failed = _OpenFailed(e, self.url, self._live(), self.stats.is_live is True, target)
            if isinstance(e, av.error.InvalidDataError) and (
                    time.perf_counter() - started >= 0.9 * self.o.open_timeout_s):
                # FFmpeg's RTSP says "Invalid data" when the wait for an answer is cut short
                failed.args = (f"it did not answer within {self.o.open_timeout_s:g} s",)
            raise failed from e
        finally:
            self.stats.open_s += time.perf_counter() - started
        with container:
            stream = self._prepare(container)
            self.guard.arm(watching=True)
            self.opened_at = time.monotonic()
            progressed = self._read(container, stream)
        if self.guard.fired:
            return self.guard.fired
        # FFmpeg's HLS demuxer reports an interrupted read (a timeout) as the end of the stream.
        if time.monotonic() - self.guard.last >= 0.9 * self.o.read_timeout_s:
            return "timed out"
        if self.stats.is_live:  # ended (EXT-X-ENDLIST) or failing: a reopen tells, it opens as VOD
            return LIVE_STOPPED
        if progressed and self.end_s is not None and self.read_to + 0.5 + 2 / self.rate < self.end_s:
            if self._local:  # read again, a file says the same: its end is gone (cut short, damaged)
                raise VideoSourceError(f"the video file {self.name} ends at {self.read_to:.1f} s of the "
                                       f"{self.end_s:.1f} s its index gives: it is cut short")
            return f"the video ended early, at {self.read_to:.1f} s of {self.end_s:.1f} s"
        return None

    def _prepare(self, container: Any) -> Any:
        if not container.streams.video:
            raise VideoSourceError(f"the video source {self.name} has no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > self.o.max_pixels:
            raise VideoSourceError(
                f"the video source {self.name} is {width}x{height}, over the {self.o.max_pixels}-pixel limit"
            )
        stream.thread_type = "AUTO"
        tb = stream.time_base
        start = (
            float(stream.start_time * tb) if stream.start_time is not None
            else container.start_time / 1e6 if container.start_time is not None else None
        )
        if self.t0 is None:
            self.t0 = start
        if not self.rate:
            self.rate = next((float(r) for r in (stream.average_rate, stream.guessed_rate) if r), 25.0)
        # A local file is never live, but a playlist (a packager writing live HLS to disk) may be.
        local = ("://" not in self.url or self.url.startswith("file:")) and container.format.name != "hls"
        self._local = local
        live = (container.duration is None or (self.sessions and not container.duration)) and not (
            local or container.format.name in NEVER_LIVE_FORMATS)
        was_live = self.stats.is_live is True
        if was_live and not live and self.stats.last_error == LIVE_STOPPED:
            self.stats.last_error = None  # it ended (EXT-X-ENDLIST): the reopen that told is no fault
        self.stats.is_live, self.stats.origin_s = live, self.t0
        # An ended live stream opens as a VOD of its last window: that is not the video's length.
        self.stats.duration_s = (container.duration / 1e6 if container.duration and not live and not was_live
                                 else None)
        self.end_s = None
        self.keyframes.reopened()
        if not live and container.duration:
            end = (
                float((stream.start_time + stream.duration) * tb)
                if stream.duration and stream.start_time is not None
                else (start or 0.0) + container.duration / 1e6
            )
            self.end_s = end - (self.t0 or 0.0)
            self.keyframes.from_index(stream, end)
            if self.last_pts is not None and self.t0 is not None:
                try:  # to the keyframe before the resume point; what precedes it is dropped
                    container.seek(int((self.t0 + self.last_pts) / tb), stream=stream, backward=True)
                except av.error.FFmpegError:
                    pass  # not seekable: decode from the start, dropping what was read already
        self._skip(stream, force=True)
        return stream

    def _skip(self, stream: Any, force: bool = False) -> None:
        on = bool(self.keyframes.on)
        if force or on != self.stats.keyframes_only:
            stream.codec_context.skip_frame = "NONKEY" if on else "DEFAULT"
            self.stats.keyframes_only = on

    def _bucket(self, pts_s: float) -> float:
        # The epsilon keeps 0.12 * 25 = 2.9999999999999996 in bucket 3.
        return math.floor(pts_s * self.o.fps + 1e-6) if self.o.fps > 0 else pts_s

    def _read(self, container: Any, stream: Any) -> bool:
        """Demux and decode to the end; True if a frame was decoded. FFmpeg errors propagate."""
        tb, self.progressed, self.clock = stream.time_base, False, time.perf_counter()
        # FFmpeg's HLS reader skips a segment it cannot fetch (VOD or live); other containers'
        # gaps may be a variable frame rate (a screen recording), not a loss
        gaps = container.format.name == "hls"
        ended: float | None = None  # where this open's packets read so far end (stream time)
        newest: float | None = None  # the latest frame decoded by this open (stream time)
        damaged: list[float] = []  # times of refused packets no frame after them has closed yet
        refusal: av.error.InvalidDataError | None = None  # the decoder's latest
        in_a_row = 0  # packets refused since a frame newer than any before
        # Closed before its container: a suspended demux generator still uses the container.
        with contextlib.closing(container.demux(stream)) as packets:
            for packet in packets:
                if self.stop.is_set():
                    break
                self.guard.progress()
                if packet.pts is not None:
                    t = float(packet.pts * tb)
                    end = t + float((packet.duration or 0) * tb)
                    if gaps:
                        self._gap(ended, t, end)
                    # back by more than a few frames' reordering: timestamps started again
                    ended = end if ended is None or t < ended - GAP_S else max(ended, end)
                    if self.t0 is not None:
                        self.read_to = max(self.read_to, t + float((packet.duration or 0) * tb) - self.t0)
                    self.keyframes.packet(t, packet.is_keyframe)
                    if packet.is_keyframe:
                        self._skip(stream)
                try:
                    frames = stream.decode(packet)
                except av.error.InvalidDataError as e:
                    # A damaged packet: FFmpeg's own command says so and decodes on (the next
                    # keyframe is whole). Reopened, the read seeked back into the damage and
                    # failed the same way, eight times, and the job with it.
                    refusal, in_a_row = e, in_a_row + 1
                    if in_a_row > MAX_REFUSED_PACKETS:
                        raise  # not damage: nothing here can be decoded
                    at = float(packet.pts * tb) if packet.pts is not None else newest
                    if at is not None and len(damaged) < MAX_REFUSED_PACKETS:
                        damaged.append(at)
                    continue
                for frame in frames:
                    if frame.pts is None or (newest is not None and frame.pts * tb <= newest):
                        continue  # held back by the decoder (B-frames, threads): older than one out
                    t = float(frame.pts * tb)
                    # The video skips from the frame before the damaged packets to this one
                    lost = [d for d in damaged if (newest is None or d > newest) and d < t]
                    if lost:
                        start = newest + 1 / self.rate if newest is not None else min(lost)
                        if t > start:
                            self._skipped(start, t, "damaged data that cannot be decoded")
                        damaged = [d for d in damaged if d >= t]
                    newest, in_a_row = t, 0
                if not all(self._frame(frame, tb) for frame in frames):
                    break
        if refusal is not None and not self.progressed:
            raise refusal  # no frame at all: a video that cannot be decoded, failed as before
        if damaged and ended is not None and not self.stop.is_set():  # its end is damaged
            start = newest + 1 / self.rate if newest is not None else min(damaged)
            if ended > start:
                self._skipped(start, ended, "damaged data that cannot be decoded")
        self.stats.decode_s += time.perf_counter() - self.clock
        return self.progressed

    def _gap(self, ended: float | None, t: float, end: float) -> None:
        """An HLS packet from `t` to `end`, after this open's packets ended at `ended` (None:
        the first of an open, a reopen or a resume). What lies between it and the furthest any
        packet reached is skipped: a reopen seeking back re-reads, and counts no gap twice. A
        live stream's jump counts at most the wall time since its last packet, plus a margin:
        an EXT-X-DISCONTINUITY (an encoder's new timeline) may jump by hours, losing nothing."""
        high, now = self.hls_ended, time.monotonic()
        if ended is not None and t < ended - GAP_S:  # timestamps started again within this open
            high = None
        start = high if high is not None else ended
        if start is not None and t - start > GAP_S:
            stop = t
            if self.stats.is_live and self.hls_packet_at is not None:
                stop = min(t, start + now - self.hls_packet_at + LIVE_GAP_MARGIN_S)
            self._skipped(start, stop, "not read while the source was reopened: it went on meanwhile"
                          if ended is None else "a segment missing or unreadable, or a pause in the video")
        self.hls_ended = end if high is None else max(high, end)
        self.hls_packet_at = now

    def _skipped(self, start: float, end: float, why: str) -> None:
        """Part of the video was not read (stream times): FFmpeg's HLS reader skips a segment it
        cannot fetch (a 404) and goes on, a live one reopened (or resumed) starts at its live
        edge, damaged packets cannot be decoded. Said, not hidden: the video is not whole."""
        at = start - (self.t0 or 0.0)
        self.stats.skipped_s += end - start
        self.stats.last_error = f"the video skips from {at:.1f} s to {at + end - start:.1f} s ({why})"
        _log.warning("video_gap", url=self.name, from_s=round(at, 2), skipped_s=round(end - start, 2))

    def _thumbnail(self, image: np.ndarray) -> np.ndarray | None:
        side = self.o.thumbnail_side
        if not side:
            return None
        step = math.ceil(max(image.shape[:2]) / side)  # every step-th pixel: cheap, and enough to look at
        return image if step <= 1 else np.ascontiguousarray(image[::step, ::step])

    def _frame(self, frame: Any, tb: Any) -> bool:
        """Sample one decoded frame and hand it on if kept; False once stopped."""
        self.stats.decoded += 1
        if self.down_since is not None:  # frames again after a failure: say so, once
            _log.info("video_source_recovered", source=self.name, failures=self.failures,
                      down_s=round(time.monotonic() - self.down_since, 1))
            self.down_since = None
        if self.failures and time.monotonic() - self.opened_at >= self.o.healthy_s:
            self.failures = 0
        if frame.pts is None:
            return True
        t = float(frame.pts * tb)
        if self.t0 is None:
            self.t0 = self.stats.origin_s = t
        pts_s = t - self.t0
        # Go on just after the latest frame (decoded, or resumed from): a live stream's encoder
        # restarted, or a camera's new session, whose timestamps start again.
        latest = max((p for p in (self.seen, self.last_pts) if p is not None), default=None)
        new_session = self.sessions and not self.progressed
        if self.stats.is_live and latest is not None and (
                pts_s < latest - DISCONTINUITY_S or (new_session and pts_s <= latest)):
            self.t0 += pts_s - latest - 1 / self.rate
            pts_s = t - self.t0
        self.seen = pts_s
        self.stats.position_s, self.progressed = pts_s, True
        bucket = self._bucket(pts_s)
        if (self.last_pts is not None and pts_s <= self.last_pts) or bucket <= self.last_bucket:
            return True
        image = upright_rgb(frame)
        # max(): with a variable frame rate two frames may round to one index
        index = max(round(pts_s * self.rate), self.last_index + 1)
        self.last_pts, self.last_bucket, self.last_index = pts_s, bucket, index
        self.stats.kept += 1
        self.stats.decode_s += time.perf_counter() - self.clock
        delivered = self.emit(VideoFrame(index, pts_s, image, bool(frame.key_frame), self._thumbnail(image)))
        self.clock = time.perf_counter()
        self.guard.progress()  # time blocked on a slow consumer is no stall
        return delivered


_END: Final = object()


class _Handoff:
    """From the reader thread to the event loop. The thread takes a slot before it queues a
    frame and the consumer gives it back on taking the frame, so at most `size` frames wait: a
    slow consumer holds the reader (and FFmpeg's reads) back, never memory."""

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int, stop: threading.Event) -> None:
        self.loop, self.stop = loop, stop
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.slots = threading.Semaphore(size)

    def put(self, frame: VideoFrame) -> bool:
        while not self.slots.acquire(timeout=0.1):
            if self.stop.is_set():
                return False
        return self.post(frame)

    def post(self, item: Any) -> bool:
        """Queue at once, with no slot (the end, an error)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is reading any more
            return False
        return True

    async def get(self) -> Any:
        item = await self.queue.get()
        if isinstance(item, VideoFrame):
            self.slots.release()
        return item


class VideoSource:
    """One video source, read by a thread of its own. One read at a time; a later `frames()`
    starts a new read (resume it with `after_s`). `stats` are the current (or last) read's."""

    def __init__(self, url: str, options: ReaderOptions | None = None) -> None:
        self.url = url
        self.options = options or ReaderOptions()
        self.stats = ReaderStats()
        self._stop: threading.Event | None = None
        self._handoff: _Handoff | None = None
        self._thread: threading.Thread | None = None

    @property
    def is_live(self) -> bool | None:
        """None until opened. A live HLS stream that ends reopens as VOD: False from then on."""
        return self.stats.is_live

    @property
    def duration_s(self) -> float | None:
        return self.stats.duration_s

    async def frames(
        self, after_s: float | None = None, origin_s: float | None = None
    ) -> AsyncIterator[VideoFrame]:
        """The frames, sampled to `options.fps`, each after `after_s` (a pts_s handled already;
        a VOD read seeks there). Resuming a live read in another reader also takes the first
        one's `stats.origin_s`: live positions count from where a read began. Raises
        VideoSourceError when the source cannot be read. Leaving early: stop() or aclose()."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError(f"{keys.public_url(self.url)} is already being read")
        stop = threading.Event()
        handoff = _Handoff(asyncio.get_running_loop(), max(1, self.options.queue_size), stop)
        self.stats = ReaderStats()
        self._stop, self._handoff = stop, handoff
        reader = _Reader(self.url, self.options, self.stats, stop, handoff.put)
        self._thread = threading.Thread(
            target=_run, args=(reader, handoff, after_s, origin_s), name=f"video {reader.name}", daemon=True
        )
        self._thread.start()
        try:
            while (item := await handoff.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()

    def stop(self) -> None:
        """End the current read: `frames()` ends at once, the thread within ~0.1 s even inside a
        network read (were the interrupt seam gone: within its timeout)."""
        if self._stop is not None and self._handoff is not None:
            self._stop.set()
            self._handoff.post(_END)

    async def wait_stopped(self, timeout_s: float = 5.0) -> bool:
        """Wait, without blocking the loop, for the reader thread to leave; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self._thread is not None and self._thread.is_alive():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True


def _run(reader: _Reader, handoff: _Handoff, after_s: float | None, origin_s: float | None) -> None:
    try:
        reader.run(after_s, origin_s)
    except Exception as e:  # the consumer raises it (an unexpected one is a bug worth seeing)
        reader.stats.last_error = str(e)
        handoff.post(e)
    else:
        handoff.post(_END)
