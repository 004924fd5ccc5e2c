"""The video reader on files (MP4 and HLS VOD made here, no sockets): sampling by PTS, every
frame, keyframes only, resuming, backpressure, stop, and sources that cannot be read."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

import numpy as np
import pytest

from sightstream.errors import SightstreamError
from sightstream.stages.video_reader import (
    ReaderOptions,
    VideoFrame,
    VideoSource,
    VideoSourceError,
    _Keyframes,
    container_options,
)
from tests import hls
from tests.conftest import wait_for
from tests.hls import SIZE, _encode, column, make_clip, make_hls_vod, make_portrait_clip

SECONDS, RATE = 6, 25


@pytest.fixture(scope="session")
def videos(tmp_path_factory) -> dict[str, str]:
    """A 6 s clip at 25 fps, a keyframe every second, as MP4 and as HLS VOD (1 s segments); and
    one with a keyframe every 5 frames (5 per second)."""
    root = tmp_path_factory.mktemp("videos")
    return {
        "mp4": str(make_clip(root / "clip.mp4", SECONDS, RATE)),
        "hls": f"file://{make_hls_vod(root / 'vod', SECONDS, RATE)}",
        "mp4_gop5": str(make_clip(root / "gop5.mp4", SECONDS, RATE, gop=5)),
        "hls_gop5": str(make_hls_vod(root / "vod_gop5", SECONDS, RATE, gop=5)),
    }


async def read(source: VideoSource, after_s: float | None = None, most: int | None = None) -> list[VideoFrame]:
    async def collect() -> list[VideoFrame]:
        out: list[VideoFrame] = []
        async with contextlib.aclosing(source.frames(after_s)) as frames:
            async for frame in frames:
                out.append(frame)
                if most is not None and len(out) >= most:
                    break
        return out

    return await asyncio.wait_for(collect(), 20)


def increasing(frames: list[VideoFrame]) -> bool:
    return all(a.index < b.index and a.pts_s < b.pts_s for a, b in zip(frames, frames[1:]))


@pytest.mark.parametrize("kind", ["mp4", "hls"])
@pytest.mark.parametrize("fps", [2, 5, 0.5])
async def test_a_vod_is_sampled_to_fps_by_presentation_time(videos, kind, fps):
    source = VideoSource(videos[kind], ReaderOptions(fps=fps, keyframes_only=False))
    frames = await read(source)
    assert abs(len(frames) - round(SECONDS * fps)) <= 1
    assert increasing(frames)
    assert all(f.image.shape == (120, 160, 3) and f.image.dtype == np.uint8 for f in frames)
    # One frame per 1/fps bucket, the first of it: exactly one in each.
    assert [int(f.pts_s * fps + 1e-6) for f in frames] == list(range(len(frames)))
    assert source.is_live is False and source.duration_s == pytest.approx(SECONDS, abs=0.1)
    assert source.stats.kept == len(frames) and source.stats.decoded == SECONDS * RATE


@pytest.mark.parametrize("kind", ["mp4", "hls"])
async def test_fps_0_gives_every_frame_with_its_own_index_and_picture(videos, kind):
    frames = await read(VideoSource(videos[kind]))
    assert [f.index for f in frames] == list(range(SECONDS * RATE))
    assert [f.pts_s for f in frames] == pytest.approx([i / RATE for i in range(SECONDS * RATE)])
    assert all(column(f.image) == (f.index * 3) % 160 for f in frames)  # the index is that frame
    assert [f.index for f in frames if f.keyframe] == list(range(0, SECONDS * RATE, RATE))


@pytest.mark.parametrize("kind", ["mp4_gop5", "hls_gop5"])
async def test_keyframes_only_is_chosen_when_fps_is_far_below_the_keyframe_rate(videos, kind):
    auto = VideoSource(videos[kind], ReaderOptions(fps=1))  # 5 keyframes/s >= 2 x 1 fps
    full = VideoSource(videos[kind], ReaderOptions(fps=1, keyframes_only=False))
    sparse, everything = await read(auto), await read(full)
    assert auto.stats.keyframes_only and not full.stats.keyframes_only
    assert len(sparse) == len(everything) == SECONDS
    assert all(f.keyframe for f in sparse[-3:])  # from the index (MP4) or after a few GOPs (HLS)
    assert auto.stats.decoded < full.stats.decoded == SECONDS * RATE
    if kind == "mp4_gop5":  # the MP4 index tells the keyframe rate before any decoding
        assert auto.stats.decoded == SECONDS * 5
        assert [f.index for f in sparse] == [f.index for f in everything]  # keyframes start each second


async def test_keyframes_only_stays_off_when_keyframes_are_too_rare_for_fps(videos):
    source = VideoSource(videos["hls"], ReaderOptions(fps=1))  # 1 keyframe/s < 2 x 1 fps
    frames = await read(source)
    assert not source.stats.keyframes_only and source.stats.decoded == SECONDS * RATE
    assert len(frames) == SECONDS


def test_keyframe_decision_from_gaps():
    k = _Keyframes(None, fps=1)  # needs a keyframe at least every 0.5 s
    for t in (0, 0.4, 0.8, 1.2):
        k.packet(t, key=True)
    assert k.on is True
    k.packet(1.8, key=False)  # 0.6 s without one: a period could be missed
    assert k.on is False
    k.packet(2.0, key=True)
    assert k.on is False  # off for good in auto mode
    assert _Keyframes(True, fps=0).on and _Keyframes(False, fps=0.1).on is False
    assert _Keyframes(None, fps=0).on is False  # every frame: there is nothing to skip


@pytest.mark.parametrize("kind", ["mp4", "hls"])
@pytest.mark.parametrize("fps", [0, 2])
async def test_a_resumed_read_continues_where_the_first_stopped(videos, kind, fps):
    options = ReaderOptions(fps=fps, keyframes_only=False)
    full = await read(VideoSource(videos[kind], options))
    first = await read(VideoSource(videos[kind], options), most=len(full) // 3)
    cut = first[-1].pts_s
    rest = await read(VideoSource(videos[kind], options), after_s=cut)
    assert rest and all(f.pts_s > cut for f in rest)
    assert [f.index for f in first + rest] == [f.index for f in full]  # no duplicate, no gap
    assert all(np.array_equal(a.image, b.image) for a, b in zip(rest, full[len(first):]))


async def test_a_resumed_read_never_repeats_the_bucket_of_after_s(videos):
    rest = await read(VideoSource(videos["mp4"], ReaderOptions(fps=1, keyframes_only=False)), after_s=2.1)
    assert [int(f.pts_s) for f in rest] == [3, 4, 5]  # bucket 2 holds 2.1: already taken


async def test_a_slow_consumer_holds_the_reader_back(videos):
    source = VideoSource(videos["mp4"], ReaderOptions(queue_size=3))
    async with contextlib.aclosing(source.frames()) as frames:
        await anext(frames)
        await wait_for(lambda: source.stats.kept >= 4, what="the queue to fill")
        await asyncio.sleep(0.3)  # the consumer takes nothing meanwhile: nothing more is read
        held = source.stats.decoded
        assert source.stats.kept == 1 + 3 + 1  # taken, queued, and one in the thread's hand
        assert held <= source.stats.kept + 2  # not the whole clip decoded into memory
        await asyncio.sleep(0.2)
        assert source.stats.decoded == held
        rest = [f async for f in frames]
    assert len(rest) == SECONDS * RATE - 1


async def test_stop_ends_the_read_and_the_thread(videos):
    source = VideoSource(videos["mp4"], ReaderOptions(queue_size=1))
    got = []

    async def consume() -> None:
        async for frame in source.frames():
            got.append(frame)
            await asyncio.sleep(0.05)

    task = asyncio.create_task(consume())
    await wait_for(lambda: len(got) >= 2, what="two frames")
    source.stop()
    await asyncio.wait_for(task, 2)
    assert await source.wait_stopped(2)
    assert len(got) < SECONDS * RATE


@pytest.mark.parametrize("url,why", [
    ("/nonexistent/clip.mp4", "No such file or directory"),
    ("file:///nonexistent/clip.mp4", "No such file or directory"),
    (__file__, "Invalid data"),  # not a video
], ids=["missing path", "missing file URL", "not a video"])
async def test_a_source_that_cannot_be_opened_fails_after_a_few_attempts(url, why):
    source = VideoSource(url, ReaderOptions(max_open_failures=2))
    started = time.monotonic()
    with pytest.raises(VideoSourceError) as e:
        await read(source)
    assert isinstance(e.value, SightstreamError)
    assert time.monotonic() - started < 3  # one back-off (<= 0.5 s) between the two attempts
    assert str(e.value).startswith("the video source ") and why in str(e.value) and "(2 attempts)" in str(e.value)
    assert source.stats.reopens == 1


async def test_a_video_over_the_pixel_limit_is_refused(videos):
    with pytest.raises(VideoSourceError, match="160x120, over the 10000-pixel limit"):
        await read(VideoSource(videos["mp4"], ReaderOptions(max_pixels=10_000)))


def test_http_options_never_reconnect_at_eof():
    o = ReaderOptions(read_timeout_s=2.5, headers={"Authorization": "Bearer t"})
    http = container_options("https://cdn.example/live.m3u8", o)
    assert http["rw_timeout"] == "2500000" and http["reconnect"] == "1"
    assert http["headers"] == "Authorization: Bearer t\r\n" and http["live_start_index"] == "-3"
    assert "reconnect_at_eof" not in http
    assert "rw_timeout" not in container_options("/srv/clip.mp4", o)  # files: no HTTP options


def test_a_network_source_may_not_open_local_files():
    from sightstream.stages.video_reader import container_options

    opts = container_options("https://cams.example/live.m3u8", ReaderOptions())
    assert "file" not in opts["protocol_whitelist"].split(",")


async def test_a_vod_missing_a_segment_says_what_was_skipped(tmp_path):
    """FFmpeg's HLS reader skips a segment it cannot fetch (a 404) and goes on: the read used to
    end as if the video were whole."""
    playlist = make_hls_vod(tmp_path / "vod", SECONDS, RATE)
    (tmp_path / "vod" / "index2.ts").unlink()  # 2 s to 3 s
    source = VideoSource(f"file://{playlist}", ReaderOptions(fps=5, keyframes_only=False))
    frames = await read(source)
    assert not any(2.0 <= f.pts_s < 3.0 for f in frames) and frames[-1].pts_s > 5
    assert source.stats.skipped_s == pytest.approx(1.0, abs=0.1)
    assert source.stats.last_error == ("the video skips from 2.0 s to 3.0 s (a segment missing or unreadable, "
                                       "or a pause in the video)")
    whole = VideoSource(f"file://{make_hls_vod(tmp_path / 'whole', SECONDS, RATE)}", ReaderOptions(fps=5))
    await read(whole)
    assert whole.stats.skipped_s == 0 and whole.stats.last_error is None


async def test_a_portrait_phone_video_is_read_the_right_way_up(tmp_path):
    """Its pictures are landscape, with a display matrix that says to turn them: models see
    what a player shows (the bright column at the pictures' left edge is the top row)."""
    from sightstream.publish import video_frames

    clip = make_portrait_clip(tmp_path / "portrait.mp4", 1, 10)
    (first,) = await read(VideoSource(str(clip), ReaderOptions(fps=0)), most=1)
    published, _ = next(video_frames(str(clip), None, 10))
    for image in (first.image, published):
        assert image.shape == (160, 120, 3)
        assert image[0, :, 1].mean() > 150 and image[-1, :, 1].mean() < 50


async def test_a_local_file_cut_short_fails_at_once_after_its_frames(tmp_path):
    """Read again, a file says the same: its end is gone. Reading it eight times over, with
    back-off, only delayed the answer by most of a minute."""
    whole = _encode(tmp_path / "whole.mp4", 4, 10, SIZE, None, fmt="mp4", options={"movflags": "+faststart"})
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[:len(whole.read_bytes()) // 2])
    source = VideoSource(str(cut), ReaderOptions(fps=0))
    frames: list[VideoFrame] = []
    with pytest.raises(VideoSourceError, match="cut short"):
        async for frame in source.frames():
            frames.append(frame)
    assert 5 < len(frames) < 40 and increasing(frames)  # what it holds was read,
    assert source.stats.decoded == len(frames)  # once


def confined_vod(tmp_path) -> tuple[Path, Path]:
    """An allowed folder holding an HLS VOD, and a folder outside it holding a clip."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    playlist = make_hls_vod(allowed / "vod", 2, RATE)
    outside.mkdir()
    make_clip(outside / "secret.mp4", 1, RATE)
    return playlist, outside


async def test_a_confined_source_reads_what_is_under_its_folders(tmp_path):
    playlist, _ = confined_vod(tmp_path)
    roots = (str(tmp_path / "allowed"),)
    frames = await read(VideoSource(str(playlist), ReaderOptions(fps=5, confine_to=roots)))
    assert len(frames) == 10 and increasing(frames)  # the playlist and each of its segments
    clip = make_clip(tmp_path / "allowed" / "clip.mp4", 1, RATE)
    assert len(await read(VideoSource(str(clip), ReaderOptions(fps=5, confine_to=roots)))) == 5


async def test_a_confined_source_never_leads_outside_its_folders(tmp_path):
    """An API job's file is checked when the job is accepted; FFmpeg then opens it again on
    each reopen (a link swapped in since would be followed) and opens what a playlist names
    (anywhere on the disk). Each of those opens is checked, on the file opened."""
    playlist, outside = confined_vod(tmp_path)
    allowed = tmp_path / "allowed"
    options = ReaderOptions(fps=5, confine_to=(str(allowed),))
    link = allowed / "swapped.mp4"
    link.symlink_to(outside / "secret.mp4")
    with pytest.raises(VideoSourceError, match=r"swapped.mp4 leads outside jobs.allowed_paths \(to .*secret"):
        await read(VideoSource(str(link), options))
    escape = allowed / "vod" / "escape.m3u8"
    escape.write_text(playlist.read_text().replace("index0.ts", "../../outside/secret.mp4"))
    with pytest.raises(VideoSourceError, match="secret.mp4 leads outside jobs.allowed_paths"):
        await read(VideoSource(str(escape), options))
    assert len(await read(VideoSource(str(escape), ReaderOptions(fps=5)))) > 0  # unconfined: read
    fifo = allowed / "fifo.mp4"
    os.mkfifo(fifo)  # put in a file's place, it would block the open for ever
    with pytest.raises(VideoSourceError, match="fifo.mp4 is not a file"):
        await read(VideoSource(str(fifo), options))


async def test_a_confined_playlist_missing_a_segment_skips_it_as_before(tmp_path, capfd):
    """FFmpeg skips a playlist's segment it cannot open; through the confined opener a missing
    one ended the read (its error raised on the next read) instead. And a playlist naming
    several files outside stops at the first, without a traceback per segment on stderr."""
    playlist, outside = confined_vod(tmp_path)
    options = ReaderOptions(fps=5, keyframes_only=False, confine_to=(str(tmp_path / "allowed"),))
    longer = make_hls_vod(tmp_path / "allowed" / "longer", 4, RATE)
    (longer.parent / "index1.ts").unlink()  # 1 s to 2 s
    source = VideoSource(str(longer), options)
    frames = await read(source)
    assert not any(1.0 <= f.pts_s < 2.0 for f in frames) and frames[-1].pts_s > 3
    assert source.stats.skipped_s == pytest.approx(1.0, abs=0.1)
    escape = playlist.parent / "escape.m3u8"
    escape.write_text(playlist.read_text().replace("index0.ts", "../../outside/secret.mp4").replace(
        "index1.ts", "../../outside/secret.mp4"))
    capfd.readouterr()
    with pytest.raises(VideoSourceError, match="leads outside jobs.allowed_paths"):
        await read(VideoSource(str(escape), options))
    assert "Traceback" not in capfd.readouterr().err


async def test_a_confined_source_may_not_be_a_concat_list(tmp_path):
    """FFmpeg's concat demuxer opens the files an ffconcat list names on its own, past the
    confined opener: a list under an allowed folder (whatever its file's name) naming a link
    there to a file elsewhere read that file in full. Unconfined, a list is read as before."""
    playlist, outside = confined_vod(tmp_path)
    allowed = tmp_path / "allowed"
    (allowed / "link.mp4").symlink_to(outside / "secret.mp4")
    listing = allowed / "innocent.mp4"
    listing.write_text("ffconcat version 1.0\nfile 'link.mp4'\n")
    with pytest.raises(VideoSourceError, match="not a video format a job may read from a file"):
        await read(VideoSource(str(listing), ReaderOptions(fps=5, confine_to=(str(allowed),))))
    assert len(await read(VideoSource(str(listing), ReaderOptions(fps=5)))) == 5
    clip = make_clip(allowed / "clip.mkv", 1, RATE)  # other containers still read
    assert len(await read(VideoSource(str(clip), ReaderOptions(fps=5, confine_to=(str(allowed),))))) == 5


def gap_reader(live: bool):
    """The reader's gap bookkeeping alone: packets handed to `_gap` as an HLS read would."""
    import threading

    from sightstream.stages.video_reader import ReaderStats, _Reader

    stats = ReaderStats()
    stats.is_live = live
    reader = _Reader("http://cams.example/live.m3u8", ReaderOptions(), stats, threading.Event(), lambda f: True)
    reader.t0 = 0.0
    return reader


def feed(reader, packets: list[float]) -> None:
    """1/10 s packets starting at each of `packets` (s), as one open of the source."""
    ended = None
    for t in packets:
        reader._gap(ended, t, t + 0.1)
        ended = t + 0.1 if ended is None or t < ended - 0.5 else max(ended, t + 0.1)


def test_a_vod_reopened_before_a_gap_does_not_count_it_twice():
    reader = gap_reader(live=False)
    feed(reader, [x / 10 for x in range(0, 20)] + [x / 10 for x in range(30, 50)])  # 2 s to 3 s missing
    assert reader.stats.skipped_s == pytest.approx(1.0)
    feed(reader, [x / 10 for x in range(10, 20)] + [x / 10 for x in range(30, 60)])  # a reopen seeks back
    assert reader.stats.skipped_s == pytest.approx(1.0)


def test_a_live_timestamp_jump_counts_no_more_than_the_time_that_went_by():
    """An EXT-X-DISCONTINUITY (an encoder's new timeline) may jump by hours: nothing was lost."""
    reader = gap_reader(live=True)
    feed(reader, [x / 10 for x in range(0, 20)])
    feed(reader, [7200.0 + x / 10 for x in range(0, 5)])  # an hour on, a moment later
    assert 0 < reader.stats.skipped_s <= 11


async def test_an_empty_file_fails_at_once_saying_so(tmp_path):
    """FFmpeg says only "Invalid argument" of a 0-byte file: taken for a passing error, it was
    tried eight times over half a minute, and the job's error named nothing."""
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoSourceError, match=r"cannot be opened: the file is empty \(0 bytes\) \(3 attempts\)"):
        await read(VideoSource(f"file://{empty}", ReaderOptions(fps=5)))


@pytest.mark.parametrize("angle", [0, 90, 180, 270])
@pytest.mark.parametrize("hflip", [False, True])
@pytest.mark.parametrize("vflip", [False, True])
def test_a_video_is_read_as_its_display_matrix_says_mirrorings_included(tmp_path, angle, hflip, vflip):
    """Turned by the matrix's angle, then mirrored, as players show it. PyAV's rotation reads a
    mirroring as a half turn: a mirrored front-camera video was read upside down."""
    import av

    from sightstream.stages.upright import upright_rgb

    stored = np.kron(np.random.default_rng(0).integers(0, 255, (3, 4, 3)), np.ones((16, 16, 1))).astype(np.uint8)
    with av.open(str(tmp_path / "v.mp4"), "w") as out:
        stream = out.add_stream("libx264", rate=10, options={"qp": "0"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv444p"
        stream.set_display_rotation(angle, hflip=hflip, vflip=vflip)
        for packet in [*stream.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")), *stream.encode()]:
            out.mux(packet)
    with av.open(str(tmp_path / "v.mp4")) as source:
        shown = upright_rgb(next(source.decode(video=0)))
    expected = np.rot90(stored, angle // 90)  # PyAV's angle: counterclockwise
    expected = expected[:, ::-1] if hflip else expected
    expected = expected[::-1] if vflip else expected
    assert shown.shape == expected.shape and np.abs(shown.astype(int) - expected).mean() < 3


@pytest.mark.parametrize("preset", ["ultrafast", "medium"])  # medium: B-frames, decoded out of order
async def test_a_file_damaged_in_the_middle_is_read_past_the_damage(tmp_path, preset):
    """Damaged packets are skipped as FFmpeg's own command skips them, and said: the read
    reopened, seeked back into the damage and failed the same way, eight times (a job failed
    after most of a minute with half its video unread). What is said skipped is what is lost."""
    clip = hls.damage(make_clip(tmp_path / "clip.mp4", 6, 10, size=(320, 240), preset=preset), 0.5, 3000)
    source = VideoSource(str(clip), ReaderOptions(fps=0))
    frames = await read(source)
    assert 35 <= len(frames) < 60 and increasing(frames) and frames[-1].pts_s > 5.5
    assert "damaged data" in source.stats.last_error and source.stats.reopens == 0
    assert abs(len(frames) + source.stats.skipped_s * 10 - 60) <= 1.01, (len(frames), source.stats.skipped_s)


async def test_a_file_whose_pictures_are_all_damaged_still_fails(tmp_path):
    clip = make_clip(tmp_path / "clip.mp4", 3, 10, size=(320, 240))
    mdat = clip.read_bytes().find(b"mdat")
    hls.damage(clip, (mdat + 400) / clip.stat().st_size, clip.stat().st_size - mdat - 400)
    with pytest.raises(VideoSourceError, match="Invalid data"):
        await read(VideoSource(str(clip), ReaderOptions(fps=0)))
