"""`sightstream publish`'s source across a Redis outage: a camera or server that gave up on a
reader paused that long is opened again, and a video resumes after the last frame sent."""

from __future__ import annotations

import json

import numpy as np
import pytest
import redis

from sightstream import publish as publish_mod
from sightstream.publish import SourceError, make_sample_video, publish, video_frames


class FlakyRedis:
    """XADD fails on the calls listed (an outage), and keeps the frames' times otherwise."""

    def __init__(self, down_on: set[int]) -> None:
        self.calls, self.down_on, self.times = 0, down_on, []

    def xadd(self, stream, fields, **kw):
        self.calls += 1
        if self.calls in self.down_on:
            raise redis.ConnectionError("Connection refused")
        self.times.append(json.loads(fields["meta"])["t"])

    def close(self):
        pass


def camera(opened: list[float | None], gives_up_at: int):
    """A live URL of 6 frames that drops its reader at frame `gives_up_at`, the first time."""

    def frames(source, fps, timeout_s, after_t=None):
        opened.append(after_t)
        for i in range(0 if after_t is None else int(after_t) + 1, 6):
            if len(opened) == 1 and i == gives_up_at:
                raise SourceError(f"{source} stopped answering (no data for {timeout_s:g} s)")
            yield np.zeros((4, 4, 3), np.uint8), float(i)

    return frames


def run(monkeypatch, client: FlakyRedis, opened: list[float | None], lines: list[str]) -> int:
    monkeypatch.setattr(publish_mod, "sync_client", lambda *a, **k: client)
    monkeypatch.setattr(publish_mod, "video_frames", camera(opened, gives_up_at=3))
    monkeypatch.setattr(publish_mod.time, "sleep", lambda s: None)
    monkeypatch.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
    return publish("redis://x", "rtsp://cam/1", "frames:{cam}", fps=0, progress=False)


def test_a_url_that_gave_up_while_redis_was_away_is_opened_again(monkeypatch):
    client, opened, lines = FlakyRedis(down_on={3, 4}), [], []  # frame 2 waits out the outage
    assert run(monkeypatch, client, opened, lines) == 6
    assert client.times == [0, 1, 2, 3, 4, 5]  # resumed after the last frame sent, none twice
    assert opened == [None, 2.0]
    assert any("stopped answering (no data for 10 s) while Redis was away; opening it again" in line
               for line in lines)


def test_a_url_that_fails_with_no_outage_is_an_error_still(monkeypatch):
    client, opened, lines = FlakyRedis(down_on=set()), [], []
    with pytest.raises(SourceError, match=r"stopped answering .* \(after 3 frames were published"):
        run(monkeypatch, client, opened, lines)
    assert opened == [None]


def test_a_video_of_known_length_resumes_after_the_time_given(tmp_path):
    video = make_sample_video(tmp_path / "v.mp4", seconds=1, fps=10, size=(64, 48))
    times = [t for _, t in video_frames(str(video), None, 10.0)]
    assert [round(t, 1) for _, t in video_frames(str(video), None, 10.0, after_t=times[4])] == [
        round(t, 1) for t in times[5:]]
    assert [round(t, 1) for _, t in video_frames(str(video), 5.0, 10.0, after_t=times[4])] == [0.6, 0.8]


def test_a_file_url_with_a_space_in_its_path_is_read(tmp_path):
    """Path.as_uri() writes a space as %20; FFmpeg's file protocol took it literally: no such file."""
    video = make_sample_video(tmp_path / "my clip #1 100%.mp4", seconds=1, fps=10, size=(64, 48))
    assert len(list(video_frames(video.as_uri(), None, 10.0))) == 10
