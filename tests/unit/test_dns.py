"""Naming a host with no address, where FFmpeg says only "Input/output error"."""

from __future__ import annotations

import socket

import pytest

from sightstream.stages import dns


def failing(errno: int):
    def lookup(host, port):
        raise socket.gaierror(errno, "lookup failed")
    return lookup


def test_a_name_with_no_address_is_named(monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", failing(socket.EAI_NONAME))
    assert dns.unresolved("https://cams.exmaple/live.m3u8") == \
        "the host cams.exmaple cannot be resolved (DNS: no such name)"
    assert dns.unresolved("rtsp://user:pw@cam.local:554/stream") is not None


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
    assert dns.unresolved(url) is None


def test_a_live_source_whose_name_is_gone_keeps_being_retried(monkeypatch):
    """A video with no address is given up on soon (a typo, most often); a camera or live
    playlist whose name went with it for a while (a reboot) is retried as long as it is live."""
    from sightstream.stages.video_reader import _OpenFailed

    monkeypatch.setattr(socket, "getaddrinfo", failing(socket.EAI_NONAME))
    io_error = OSError(5, "Input/output error")
    video = _OpenFailed(io_error, "https://cams.exmaple/clip.mp4", live=False)
    camera = _OpenFailed(io_error, "rtsp://cam-7.local/stream", live=True)
    assert video.permanent and "cams.exmaple cannot be resolved" in str(video)
    assert not camera.permanent and "cam-7.local cannot be resolved" in str(camera)
