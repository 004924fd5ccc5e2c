"""Why a video could not be opened or read: FFmpeg's words, and a host with no address named."""

from __future__ import annotations

import socket

import pytest

from sightstream.stages import video_failures


def failing(errno: int):
    def lookup(host, port):
        raise socket.gaierror(errno, "lookup failed")
    return lookup


def test_a_name_with_no_address_is_named(monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", failing(socket.EAI_NONAME))
    assert video_failures.unresolved("https://cams.exmaple/live.m3u8") == \
        "the host cams.exmaple cannot be resolved (DNS: no such name)"
    assert video_failures.unresolved("rtsp://user:pw@cam.local:554/stream") is not None


@pytest.mark.parametrize("url,errno,env", [
    # a resolver that did not answer: an outage, retried as any other
    ("https://cams.example/live.m3u8", socket.EAI_AGAIN, {}),
    ("https://cams.example/live.m3u8", socket.EAI_NONAME, {"https_proxy": "http://proxy:3128"}),  # the proxy's
    ("file:///srv/clip.mp4", socket.EAI_NONAME, {}),
    ("/srv/clip.mp4", socket.EAI_NONAME, {}),
])
def test_anything_else_is_left_to_ffmpeg_s_own_words(monkeypatch, url, errno, env):
    monkeypatch.setattr(socket, "getaddrinfo", failing(errno))
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert video_failures.unresolved(url) is None


def test_a_live_source_whose_name_is_gone_keeps_being_retried(monkeypatch):
    """A video with no address is given up on soon (a typo, most often); a camera or live
    playlist whose name went with it for a while (a reboot) is retried as long as it is live."""
    from sightstream.stages.video_reader import _OpenFailed

    monkeypatch.setattr(socket, "getaddrinfo", failing(socket.EAI_NONAME))
    io_error = OSError(5, "Input/output error")
    video = _OpenFailed(io_error, "https://cams.exmaple/clip.mp4", live=False, was_live=False)
    camera = _OpenFailed(io_error, "rtsp://cam-7.local/stream", live=True, was_live=False)
    assert video.permanent and "cams.exmaple cannot be resolved" in str(video)
    assert not camera.permanent and "cam-7.local cannot be resolved" in str(camera)


def test_a_reason_is_ffmpegs_words_without_errno_or_url() -> None:
    import av

    error = av.error.HTTPNotFoundError(-875574520, "Server returned 404 Not Found", "https://cdn.example/x.mp4")
    assert video_failures.reason(error) == "Server returned 404 Not Found"
    assert video_failures.reason(av.error.ExitError(-1414092869, "Immediate exit requested")) == "timed out"
    damaged = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
    assert "damaged" in video_failures.reason(damaged)
    assert video_failures.reason(ValueError()) == "ValueError"
