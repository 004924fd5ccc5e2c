"""Without a token, the control plane serves whoever reaches it: on the default loopback
address, this host's programs. A web page the operator has open is not one of them, yet a
browser lets it send a simple cross-site POST to 127.0.0.1 (a form, or JSON sent as
text/plain), and a page whose name it rebinds to this machine's address (DNS rebinding) can
read the answers, in the page's own origin. Two checks, only while no token is set (a token
stops both: a page cannot know it, nor send it cross-site without a CORS preflight, which is
never answered):
- `Host` must be an address (a rebound page names its own domain), a loopback name, this
  machine's host name, `control.host`, or one of `control.allowed_host_names` (a name other
  containers or hosts use for it); else 403 (but for the routes open with a token too);
- a request that changes something (not GET or HEAD) carrying an `Origin` other than the
  host it was sent to is refused; curl and scripts send no Origin.
A header that cannot be parsed is a 400."""

from __future__ import annotations

import ipaddress
import socket
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
    """`netloc` (host[:port], an IPv6 address in brackets) without its port, lower case.
    ValueError when it is no host[:port] at all."""
    parts = urlsplit(f"//{netloc}")
    parts.port  # noqa: B018 (a port that is not a number raises here)
    return (parts.hostname or "").rstrip(".")


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def browser_guard(control: ControlSettings, open_handlers: set[Handler]) -> Callable:
    """`open_handlers` (the probes, /metrics, the page, which holds no data) skip the Host
    check: load balancers and Prometheus ask them by whatever name they know the daemon by."""
    names = {socket.gethostname().lower(), socket.getfqdn().lower(), control.host.lower(),
             *(n.lower().rstrip(".") for n in control.allowed_host_names)}

    def host_allowed(host: str) -> bool:
        return _is_address(host) or is_loopback(host) or host in names

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if control.auth:
            return await handler(request)
        host = request.headers.get("Host", "")
        origin = request.headers.get("Origin")
        try:
            host_name = _host_part(host) if host else ""
            origin_netloc = urlsplit(origin).netloc.lower() if origin and origin != "null" else ""
        except ValueError:
            return error_response(400, "the Host or Origin header is not a host[:port] or an origin")
        if host and not host_allowed(host_name) and request.match_info.handler not in open_handlers:
            return error_response(403, f"Host {host!r} is not a name of this daemon: without control.token "
                                  "it answers requests that name an address, localhost, this machine's host "
                                  "name or one of control.allowed_host_names (a web page whose name is "
                                  "rebound to this address names its own); set control.token, or list the "
                                  "name there")
        if request.method not in READS and origin is not None and (
                origin == "null" or origin_netloc != host.lower()):
            return error_response(403, f"a request from the web page at {origin} cannot change this daemon: "
                                  "without control.token, only programs may (browsers name the page in "
                                  "Origin; curl and scripts send none)")
        return await handler(request)

    return guard
