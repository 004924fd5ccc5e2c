"""Why a network video could not be opened, when FFmpeg cannot say: its error for a host name
that does not resolve is "Input/output error", which sends a user looking at the wrong thing."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit


def unresolved(url: str) -> str | None:
    """"the host … cannot be resolved" when the URL names a host that has no address, else
    None. Blocking (a DNS lookup): ask only after an open failed, and off the event loop."""
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return None
    if not host or urlsplit(url).scheme.lower() == "file":
        return None
    try:
        socket.getaddrinfo(host, None)
    except socket.gaierror:
        return f"the host {host} cannot be resolved (DNS: no such name, or no resolver answers)"
    except (OSError, UnicodeError):
        return None
    return None
