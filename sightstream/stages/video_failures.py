"""Why a video could not be opened or read, in words a user can act on: FFmpeg's own, without
its errno; and for a host name that does not resolve, that, where FFmpeg only says
"Input/output error", which sends a user looking at the wrong thing."""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import av

# the name has no address; not EAI_AGAIN (a resolver that did not answer: an outage, retried)
NO_SUCH_NAME = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


def unresolved(url: str) -> str | None:
    """"the host … cannot be resolved" when the URL names a host that has no address, else
    None. Blocking (a DNS lookup): ask only after an open failed, and off the event loop."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if not host or scheme == "file" or (scheme in ("http", "https") and _proxied(scheme)):
        return None  # through a proxy, this host needs no address of its own
    try:
        socket.getaddrinfo(host, None)
    except socket.gaierror as e:
        return f"the host {host} cannot be resolved (DNS: no such name)" if e.errno in NO_SUCH_NAME else None
    except (OSError, UnicodeError):
        return None
    return None


def redirect_target(url: str, headers: Mapping[str, str], timeout_s: float) -> str | None:
    """Where an HTTP(S) URL redirects to (its Location), or None: it does not, or cannot be
    asked. FFmpeg told to follow no redirect says only "Input/output error", as for a TLS
    handshake or a dropped connection. Blocking: ask only after an open failed, off the loop."""
    class NoRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None  # the 3xx is raised as an HTTPError, to read

    opener = urllib.request.build_opener(NoRedirects)
    try:
        request = urllib.request.Request(url, headers=dict(headers), method="HEAD")
        opener.open(request, timeout=timeout_s).close()
    except urllib.error.HTTPError as e:
        if 300 <= e.code < 400:
            return e.headers.get("Location") or "elsewhere"
    except (OSError, ValueError):
        pass
    return None


def _proxied(scheme: str) -> bool:
    return any(os.environ.get(name) for name in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY"))


def reason(error: BaseException) -> str:
    """FFmpeg's words for an error, without its errno and the URL again."""
    if isinstance(error, av.error.ExitError):
        return "timed out"  # PyAV's own timeouts; a caller that set its own tells them apart first
    if isinstance(error, UnicodeDecodeError):  # PyAV reading a damaged file's metadata as text
        return "it is not a video that can be read (damaged?): its metadata is not text"
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


INDEXED_SUFFIXES = (".mp4", ".m4v", ".mov")  # containers whose index (moov) may be at the end


def index_at_end_hint(url: str) -> str:
    """For an MP4 over HTTP that cannot be read: a likely cause that is not damage. With its
    index at the end, FFmpeg must jump there and back; a server that does not answer Range
    requests (python -m http.server, some CDNs' defaults) makes it fail as if damaged."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return ""
    if parts.scheme.lower() not in ("http", "https") or not parts.path.lower().endswith(INDEXED_SUFFIXES):
        return ""
    return ("; if the file plays elsewhere, its index (moov) is likely at its end and the server does not "
            "answer Range requests: serve it from one that does, or with the index first "
            "(ffmpeg -i in.mp4 -c copy -movflags +faststart out.mp4)")


def empty_file(url: str) -> bool:
    """A local file of 0 bytes (a copy or an upload that failed): FFmpeg says only "Invalid
    argument", an error taken for a passing one, tried eight times over half a minute."""
    path = url[len("file://"):] if url.startswith("file://") else url if "://" not in url else None
    try:
        return path is not None and os.stat(path).st_size == 0
    except (OSError, ValueError):
        return False
