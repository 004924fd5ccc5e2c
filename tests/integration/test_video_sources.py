"""The video reader over HTTP on 127.0.0.1: MP4 and HLS VOD from a static server, and a live
HLS server (tests/hls.py) that advances with wall time, stalls, 404s and ends on command."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import pytest

from sightstream.stages.video_reader import ReaderOptions, VideoFrame, VideoSource, VideoSourceError
from tests.conftest import wait_for
from tests.hls import live_hls, make_clip, make_damaged_clip, make_hls_vod, static_server

pytestmark = pytest.mark.integration

LIVE_RATE = 10  # the live source: 1 s segments of 10 frames, a window of 3


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media")
    make_clip(root / "clip.mp4", 6, 25)
    make_hls_vod(root / "vod", 6, 25)
    make_hls_vod(root / "live", 90, LIVE_RATE)  # plenty for any one test's wall time
    return root


@pytest.fixture(scope="session")
def static(media):
    with static_server(media) as server:
        yield server


@pytest.fixture
def live(media):
    with live_hls(media / "live" / "index.m3u8") as server:
        yield server


class Reader:
    """Consumes a source in a task, keeping the frames and when each arrived."""

    def __init__(self, source: VideoSource, after_s: float | None = None) -> None:
        self.source = source
        self.frames: list[VideoFrame] = []
        self.arrived: list[float] = []
        self.task = asyncio.create_task(self._consume(after_s))

    async def _consume(self, after_s: float | None) -> None:
        async with contextlib.aclosing(self.source.frames(after_s)) as frames:
            async for frame in frames:
                self.frames.append(frame)
                self.arrived.append(time.monotonic())

    async def __aenter__(self) -> Reader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.source.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.task, 5)
        assert await self.source.wait_stopped(5)

    def ordered(self) -> bool:
        f = self.frames
        return all(a.index < b.index and a.pts_s < b.pts_s for a, b in zip(f, f[1:]))


@pytest.mark.parametrize("path", ["clip.mp4", "vod/index.m3u8"])
async def test_an_http_vod_is_sampled_to_fps(static, path):
    source = VideoSource(static.url(path), ReaderOptions(fps=2, keyframes_only=False))
    async with Reader(source) as r:
        await asyncio.wait_for(r.task, 20)
    assert abs(len(r.frames) - 12) <= 1 and r.ordered()
    assert all(f.image.shape == (120, 160, 3) for f in r.frames)
    assert source.is_live is False and source.duration_s == pytest.approx(6, abs=0.1)


async def test_a_vod_that_hangs_midway_is_reopened_and_resumed_without_repeats(media):
    full = [f async for f in VideoSource(str(media / "vod" / "index.m3u8")).frames()]
    options = ReaderOptions(stall_s=1, read_timeout_s=5)
    with static_server(media, hang_once=["vod/index3.ts"]) as server:
        source = VideoSource(server.url("vod/index.m3u8"), options)
        async with Reader(source) as r:
            await asyncio.wait_for(r.task, 20)
    assert source.stats.reopens == 1 and source.stats.last_error == "no frame for 1 s"
    assert [f.index for f in r.frames] == [f.index for f in full]  # resumed after the last one


async def test_a_live_stream_keeps_coming_and_ends_with_its_playlist(live):
    source = VideoSource(live.url, ReaderOptions(read_timeout_s=3))
    async with Reader(source) as r:
        # The first window (3 s) comes at once; what follows came from reloads of the playlist.
        await wait_for(lambda: len(r.frames) >= 5 * LIVE_RATE, 15, "two segments past the first window")
        assert source.is_live is True and source.duration_s is None
        assert r.arrived[-1] - r.arrived[0] > 1.0  # paced by the source, not read in one go
        live.end()
        await asyncio.wait_for(r.task, 15)  # EXT-X-ENDLIST read to the end: the read ends
    assert r.ordered() and [f.index for f in r.frames] == list(range(len(r.frames)))
    # an end is no fault, and the last window's length is not the video's
    assert source.stats.last_error is None and source.duration_s is None


async def test_a_404_source_fails_fast_while_another_keeps_delivering(static, live):
    good = VideoSource(live.url)
    bad = VideoSource(static.url("missing/live.m3u8?token=secret"))
    async with Reader(good) as r:
        await wait_for(lambda: len(r.frames) >= 3 * LIVE_RATE, 10, "the good source's first window")
        started = time.monotonic()
        with pytest.raises(VideoSourceError) as e:
            await asyncio.wait_for(anext(bad.frames()), 10)
        failed = time.monotonic()
        assert failed - started < 5
        assert str(e.value) == (
            f"the video source {static.url('missing/live.m3u8')}?token=*** cannot be opened: "  # secret masked
            "Server returned 404 Not Found (3 attempts)"
        )
        await wait_for(lambda: r.arrived[-1] > failed + 1, 5, "frames after the failure")
    # The good source went on at its own pace (a segment a second) all along.
    during = [started] + [t for t in r.arrived if t > started]
    assert max(b - a for a, b in zip(during, during[1:])) < 1.6


async def test_a_live_source_that_answers_404_for_a_while_is_read_on_when_it_is_back(live):
    """A packager restarting answers 404 for a while: a source already read live waits (a job
    gives up after jobs.give_up_s), rather than failing after three quick tries."""
    source = VideoSource(live.url, ReaderOptions(read_timeout_s=3, max_backoff_s=0.5))
    async with Reader(source) as r:
        await wait_for(lambda: len(r.frames) >= 1, 10, "a frame")
        live.not_found()
        await wait_for(lambda: source.stats.reopens >= 4, 15, "tries past the three a refusal gets")
        assert "404 Not Found" in (source.stats.last_error or "") and not r.task.done()
        read = len(r.frames)
        live.not_found(False)
        await wait_for(lambda: len(r.frames) > read, 15, "frames once it answers again")
    assert r.ordered()


async def test_a_live_stream_missing_a_segment_says_what_was_skipped(media):
    """FFmpeg's HLS reader skips a segment it cannot fetch: said for a VOD, silent for a live
    stream, whose job ended `completed` as if it were whole."""
    with live_hls(media / "live" / "index.m3u8") as live:
        live.lost.add("index5.ts")  # 5 s to 6 s, ahead of the first window
        source = VideoSource(live.url, ReaderOptions(read_timeout_s=3, keyframes_only=False))
        async with Reader(source) as r:
            await wait_for(lambda: any(f.pts_s >= 6.5 for f in r.frames), 15, "frames past the lost segment")
    assert not any(5.0 <= f.pts_s < 6.0 for f in r.frames)
    assert source.stats.skipped_s == pytest.approx(1.0, abs=0.15)
    assert source.stats.last_error == ("the video skips from 5.0 s to 6.0 s (a segment missing or unreadable, "
                                       "or a pause in the video)")


async def test_a_live_stream_reopened_at_its_edge_says_what_went_by_and_ends_without_waiting_a_back_off(live):
    """Reopened after an outage, a live stream starts at its live edge: what came meanwhile was
    skipped, and not said. Its back-off, grown during the outage, then delayed its end."""
    source = VideoSource(live.url, ReaderOptions(read_timeout_s=3))
    async with Reader(source) as r:
        await wait_for(lambda: len(r.frames) >= 1, 10, "a frame")
        live.not_found()
        await wait_for(lambda: source.stats.reopens >= 5, 20, "an outage with its back-off grown")
        read = len(r.frames)
        live.not_found(False)
        await wait_for(lambda: len(r.frames) > read + LIVE_RATE, 20, "frames once it answers again")
        assert source.stats.skipped_s > 1
        assert "(not read while the source was reopened: it went on meanwhile)" in source.stats.last_error
        live.end()
        ended = time.monotonic()
        await asyncio.wait_for(r.task, 15)
        assert time.monotonic() - ended < 3  # one quick reopen finds the end (it waited 4-8 s)
    assert r.ordered()


async def test_a_vod_cut_short_over_http_fails_after_its_tries(tmp_path):
    """Each reopen re-read (and threw away) the frames up to where it broke: taken for a source
    that came back, its failures were reset each time, and the job retried it for ever."""
    import av

    clip = make_clip(tmp_path / "whole.mp4", 10, 10)
    faststart = tmp_path / "served" / "cut.mp4"  # the index first, so that half of it opens
    faststart.parent.mkdir()
    with av.open(str(clip)) as src, av.open(str(faststart), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    faststart.write_bytes(faststart.read_bytes()[: faststart.stat().st_size // 2])
    with static_server(faststart.parent) as server:
        source = VideoSource(server.url("cut.mp4"), ReaderOptions(max_vod_failures=3, fps=5))
        async with Reader(source) as r:
            with pytest.raises(VideoSourceError, match=r"keeps failing: .* \(3 attempts\)"):
                await asyncio.wait_for(r.task, 20)
        assert r.frames and source.stats.reopens == 2


async def test_a_stalled_source_is_reopened_by_the_watchdog(live):
    options = ReaderOptions(stall_s=1.5, open_timeout_s=1, read_timeout_s=5, max_backoff_s=1)
    source = VideoSource(live.url, options)
    async with Reader(source) as r:
        await wait_for(lambda: len(r.frames) >= 4 * LIVE_RATE, 15, "a segment past the first window")
        live.stall()  # requests hang: nothing more comes
        before = len(r.frames)
        await wait_for(lambda: source.stats.reopens >= 1, 10, "the watchdog to reopen")
        assert source.stats.last_error == "no frame for 1.5 s"
        live.resume()
        await wait_for(lambda: len(r.frames) > before + LIVE_RATE, 15, "frames after the stall")
    assert r.ordered()  # nothing twice, though the reopened window replays segments


async def test_stop_ends_a_read_blocked_on_a_hung_server(live):
    # Timeouts far longer than the test: only stop() can end this read.
    options = ReaderOptions(stall_s=30, open_timeout_s=30, read_timeout_s=30)
    source = VideoSource(live.url, options)
    async with Reader(source) as r:
        await wait_for(lambda: len(r.frames) >= 3 * LIVE_RATE, 10, "the first window")
        asked = live.requests
        live.stall()
        await wait_for(lambda: live.requests > asked, 10, "the reader to block on a request")
        stopped = time.monotonic()
        source.stop()
        await asyncio.wait_for(r.task, 2)
        assert await source.wait_stopped(2)  # the thread left FFmpeg's read too
        assert time.monotonic() - stopped < 2


async def test_a_playlist_from_the_network_cannot_read_the_hosts_files(media, static):
    # A served playlist whose one segment is a local file: nothing of it may be read.
    segment = media / "vod" / "index0.ts"
    (media / "evil.m3u8").write_text("#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:1\n"
                                     f"#EXTINF:1.0,\nfile://{segment}\n#EXT-X-ENDLIST\n")
    source = VideoSource(static.url("evil.m3u8"), ReaderOptions(max_open_failures=1, max_vod_failures=1))
    frames = []
    with pytest.raises(VideoSourceError):
        async for frame in source.frames():
            frames.append(frame)
    assert frames == []


def test_publish_of_a_folder_skips_what_is_no_image_and_says_so(redis_url, sync_redis, tmp_path, gradient, capsys):
    """A damaged file stopped the whole folder ('cannot identify image file'), and a GIF in a
    folder was left out without a word (alone, it was published)."""
    from PIL import Image

    from sightstream.publish import publish

    folder = tmp_path / "shots"
    folder.mkdir()
    Image.fromarray(gradient).save(folder / "a.png")
    (folder / "b.jpg").write_bytes(b"not a jpeg")
    Image.fromarray(gradient).save(folder / "c.gif")
    (folder / "notes.txt").write_text("left alone")
    assert publish(redis_url, str(folder), "frames:{shots}", progress=False) == 2
    files = [json.loads(f[b"meta"])["file"] for _, f in sync_redis.xrange("frames:{shots}")]
    assert files == ["a.png", "c.gif"]
    assert "skipped b.jpg: it cannot be read as an image" in capsys.readouterr().err


def test_publish_of_a_video_that_gives_no_frame_says_so(redis_url, sync_redis, tmp_path):
    """Exit 0 with "published 0 frames" said the damaged file was fine; --loop would spin."""
    from sightstream.publish import SourceError, publish

    damaged = make_damaged_clip(tmp_path / "damaged.mp4")
    with pytest.raises(SourceError, match="failed: Invalid data|gave no frame"):
        publish(redis_url, str(damaged), "frames:{d}", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds no image"):
        publish(redis_url, str(tmp_path / "empty"), "frames:{d}", loop=True, progress=False)
    assert not sync_redis.exists("frames:{d}")


async def test_each_outage_and_each_recovery_of_a_source_is_logged(live):
    """A fault soon after the last one came back was not logged (the failure count resets only
    after 30 s of frames), nor was a recovery: a camera's log said nothing of either."""
    from structlog.testing import capture_logs

    source = VideoSource(live.url, ReaderOptions(read_timeout_s=3, max_backoff_s=0.3))
    with capture_logs() as logged:
        async with Reader(source) as r:
            for _ in range(2):  # two outages, a few seconds apart
                await wait_for(lambda: len(r.frames) >= 1, 10, "a frame")
                reopens = source.stats.reopens
                live.not_found()
                await wait_for(lambda n=reopens: source.stats.reopens > n, 10, "a failure")
                read = len(r.frames)
                live.not_found(False)
                await wait_for(lambda n=read: len(r.frames) > n, 15, "frames again")
    events = [e["event"] for e in logged if e["event"].startswith("video_source_")]
    assert events == ["video_source_failed", "video_source_recovered"] * 2, events
    assert all(e["source"] == live.url for e in logged if e["event"].startswith("video_source_"))


async def test_an_rtsp_server_that_never_answers_is_said_so(unused_tcp_port):
    """FFmpeg says "Invalid data found" when its wait for the RTSP answer is cut short."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", unused_tcp_port))
    server.listen(4)  # connections are accepted by the kernel and never answered
    try:
        source = VideoSource(f"rtsp://127.0.0.1:{unused_tcp_port}/stream1",
                             ReaderOptions(open_timeout_s=1, max_backoff_s=0.2, max_open_failures=2))
        with pytest.raises(VideoSourceError, match="it did not answer within 1 s"):
            async with Reader(source) as r:
                await asyncio.wait_for(r.task, 20)
    finally:
        server.close()
