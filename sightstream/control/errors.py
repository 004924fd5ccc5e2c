"""JSON errors for every failure, and bearer-token auth.

Errors look like {"error": {"code": "not_found", "message": "..."}} with a 4xx status; bad
input never gives a 500 (an unexpected exception is a bug: logged, and answered as JSON)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

from sightstream import log

_log = log.get(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN_PREFIXES = ("/health", "/metrics")

CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type",
    422: "unprocessable", 503: "unavailable", 507: "insufficient_memory",
}


def error_response(status: int, message: str, code: str | None = None) -> web.Response:
    return web.json_response(
        {"error": {"code": code or CODES.get(status, "error"), "message": message}}, status=status
    )


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        message = e.text if e.text and not e.text.startswith(f"{e.status}:") else e.reason
        if e.status == 413:
            message = f"the body is too large: {message}"
        return error_response(e.status, message)
    except Exception:
        _log.exception("control_handler_failed", path=request.path)
        return error_response(500, "internal error: see the daemon's log", "internal")


def require_token(token: str) -> Callable:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token and not request.path.startswith(OPEN_PREFIXES):
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return error_response(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
        return await handler(request)

    return auth
