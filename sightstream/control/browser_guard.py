"""Without a token, a control plane on loopback serves whoever reaches it: this host's
programs. A web page the operator has open is not one of them, yet a browser lets it send a
simple cross-site POST to 127.0.0.1 (a form, or JSON sent as text/plain), and a page whose
name it rebinds to 127.0.0.1 (DNS rebinding) can read the answers. Two checks, only while no
token is set (a token stops both: a page cannot know it, nor send it cross-site without a CORS
preflight, which is never answered):
- a request that changes something (not GET or HEAD) carrying an `Origin` other than the
  host it was sent to is refused; curl and scripts send no Origin;
- on a loopback address, a `Host` that is not a loopback name (localhost, 127.x.x.x, ::1) is
  refused."""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web

from sightstream.config import ControlSettings
from sightstream.control.errors import error_response

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
READS = ("GET", "HEAD")


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name, without a port) is this machine's loopback."""
    host = host.strip("[]").lower().rstrip(".")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost" or host.endswith(".localhost")


def _host_part(netloc: str) -> str:
    """`netloc` (host[:port], an IPv6 address in brackets) without its port."""
    return urlsplit(f"//{netloc}").hostname or ""


def browser_guard(control: ControlSettings) -> Callable:
    on_loopback = is_loopback(control.host)

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if control.auth:
            return await handler(request)
        host = request.headers.get("Host", "")
        if on_loopback and host and not is_loopback(_host_part(host)):  # none: an HTTP/1.0 client
            return error_response(403, f"Host {host!r} is not a loopback name: without control.token this "
                                  "daemon answers only requests that name localhost, 127.0.0.1 or ::1 (a web "
                                  "page whose name is rebound to this address is refused); set control.token "
                                  "to serve other names")
        origin = request.headers.get("Origin")
        if request.method not in READS and origin is not None and (
                origin == "null" or urlsplit(origin).netloc.lower() != host.lower()):
            return error_response(403, f"a request from the web page at {origin} cannot change this daemon: "
                                  "without control.token, only this host's programs may (browsers name the "
                                  "page in Origin; curl and scripts send none)")
        return await handler(request)

    return guard
