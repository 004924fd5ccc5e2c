"""What a job may read, checked before it is accepted: `http(s)://` videos and HLS playlists
(optionally only from `jobs.allowed_hosts`), `file://` paths only under `jobs.allowed_paths`
(none by default: a control plane must not read the host's files unless told to), and
`redis://<stream key>` for a stream of frames as producers XADD them."""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from sightstream import keys
from sightstream.config import JobSettings
from sightstream.errors import SightstreamError
from sightstream.stages.confined_files import within

SCHEMES = ("http", "https", "rtsp", "rtsps", "file", "redis")
# redis://127.0.0.1:6379/frames:{cam1}: a server and a key, where a stream key alone belongs
SERVER_AND_KEY = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|localhost|[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+):\d{1,5}/")


class SourceRefused(SightstreamError):
    """A job source the daemon will not read; the message says why."""


@dataclass(frozen=True)
class Source:
    url: str
    kind: str  # video | stream
    location: str  # the URL or path PyAV opens, or the stream key

    @property
    def is_stream(self) -> bool:
        return self.kind == "stream"

    @property
    def always_live(self) -> bool:
        """It never ends by itself: a stream of frames, a camera (RTSP). A live HLS playlist
        is one too, but that is known only once it is opened."""
        return self.is_stream or self.url.lower().startswith(("rtsp://", "rtsps://"))


def allowed_roots(settings: JobSettings) -> tuple[str, ...]:
    """`jobs.allowed_paths`, resolved."""
    return tuple(os.path.realpath(p) for p in settings.allowed_paths)


def check_source(url: str, settings: JobSettings, trusted: bool = False, on_disk: bool = True) -> Source:
    """The source to read for `url`, or SourceRefused naming the reason. `trusted`: the
    operator's own config lists it (a pipeline's input), so the allow-lists do not apply.
    `on_disk`: a file:// source must be a file here now (not so at a daemon's start: a file
    input read once and deleted since, or on other hosts' disks, must not stop the daemon)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in SCHEMES:
        raise SourceRefused(f"source must start with {', '.join(s + '://' for s in SCHEMES)}")
    if scheme == "redis":
        key = url[len("redis://"):]
        if not key:
            raise SourceRefused("a redis:// source names a stream key: redis://frames:{cam1}")
        if keys.is_own_output(key, []) or key.startswith("results:"):
            raise SourceRefused(f"{key} is one of sightstream's own output streams")
        if any(c in key for c in "*?["):  # as a literal key, it would wait for ever on nothing
            raise SourceRefused(f"redis://{key} is a glob: a job reads one stream, named in full "
                                "(redis://frames:{cam1}); a pipeline's input takes globs")
        if SERVER_AND_KEY.match(key):
            raise SourceRefused(f"redis://{key} names a Redis server: a job reads a stream of the "
                                "daemon's own Redis, named alone (redis://frames:{cam1})")
        return Source(url, "stream", key)
    if any(ord(c) < 32 or c == "\x7f" for c in unquote(url)):  # a NUL or a newline: no path or host has one
        raise SourceRefused("the source URL holds a control character (such as %00)")
    try:
        parts = urlsplit(url)
        port = parts.port  # checked here: out of range, it would fail the job later, when read
    except ValueError as e:  # "Invalid IPv6 URL", "Port out of range 0-65535"
        raise SourceRefused(f"the source URL cannot be read: {keys.url_error(e)}") from None
    if port == 0:
        raise SourceRefused("the source URL's port is 0")
    if scheme == "file":
        path = os.path.realpath(unquote(parts.path))
        roots = allowed_roots(settings)
        if not trusted and not within(path, roots):
            raise SourceRefused("file:// sources must be under jobs.allowed_paths"
                                + ("" if roots else " (none are allowed: set it in the config)"))
        if on_disk and not os.path.isfile(path):
            raise SourceRefused(f"{path} is not a file")
        return Source(url, "video", path)
    host = (parts.hostname or "").lower()
    if not host:
        raise SourceRefused(f"the source URL names no host ({scheme}://<host>/…)")
    if any(c.isspace() for c in host):  # no host name has one: it would fail later, as unresolvable
        raise SourceRefused(f"the source URL's host {host!r} holds a space")
    allowed = [h.lower() for h in settings.allowed_hosts]
    if allowed and not trusted and not any(fnmatch.fnmatchcase(host, pattern) for pattern in allowed):
        raise SourceRefused(f"host {host} is not in jobs.allowed_hosts")
    return Source(url, "video", url)
