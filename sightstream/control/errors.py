"""JSON errors for every failure, and bearer-token auth.

Errors look like {"error": {"code": "not_found", "message": "..."}} with a 4xx status; bad
input never gives a 500 (an unexpected exception is a bug: logged, and answered as JSON)."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sightstream import log
from sightstream.config import ControlSettings
from sightstream.control.api import TOKEN_NAME, ApiError

_log = log.get(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type",
    422: "unprocessable", 503: "unavailable", 507: "insufficient_memory",
}


def error_response(status: int, message: str, code: str | None = None) -> web.Response:
    return web.json_response(
        {"error": {"code": code or CODES.get(status, "error"), "message": message}}, status=status
    )


# A GET answers from memory and Redis: past this, Redis is taken for unreachable (a hung node
# of a cluster made reads wait through every retry, minutes). Below the 10 s the CLI waits.
GET_LIMIT_S = 8.0


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        if request.method not in ("GET", "HEAD"):  # a HEAD is a GET without its body
            return await handler(request)
        bound = asyncio.timeout(GET_LIMIT_S)
        try:
            async with bound:
                return await handler(request)
        except TimeoutError:
            if not bound.expired():
                raise  # a handler's own timeout: a bug, answered below
            return error_response(503, f"redis is unreachable: no answer within {GET_LIMIT_S:g} s",
                                  "unavailable")
    except ApiError as e:
        response = error_response(e.status, e.message, e.code)
        response.headers.update(e.headers)
        if e.status == 413:
            response.force_close()  # the body is left unread: the connection cannot go on
        return response
    except (RedisConnectionError, RedisTimeoutError) as e:
        return error_response(503, f"redis is unreachable: {e}", "unavailable")
    except ResponseError as e:  # out of memory, read-only replica, …: Redis' state, not the request's
        _log.warning("control_redis_refused", path=request.path, error=str(e))
        return error_response(503, f"redis refused the command: {e}", "unavailable")
    except web.RequestPayloadError as e:  # the body cannot be read as sent (gzip that is not gzip)
        cause = e.__cause__ or (e.args[0] if e.args else e)
        why = cause.message if isinstance(cause, HttpProcessingError) else str(cause)
        response = error_response(400, f"the body cannot be read: {why.strip()}")
        response.force_close()  # the rest of the body is unread: the connection cannot go on
        return response
    except ConnectionResetError:
        if request.transport is not None and not request.transport.is_closing():
            _log.exception("control_handler_failed", path=request.path)  # not the client's: a bug
            return error_response(500, "internal error: see the daemon's log", "internal")
        _log.info("client_disconnected", path=request.path)  # it went away mid-upload: nobody to answer
        return error_response(400, "the connection was lost before the request was read")
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


# What aiohttp undoes (br and zstd with their packages installed; without, it says so).
CODINGS = {"", "identity", "gzip", "deflate", "br", "zstd"}


def body_limits(max_bytes: int) -> Callable:
    """A body refused from its headers, before it is read: one declared larger than
    max_upload_mb (it used to be read up to the limit first, or waited for), and a
    Content-Encoding nothing undoes (it used to be read as plain bytes)."""

    @web.middleware
    async def limits(request: web.Request, handler: Handler) -> web.StreamResponse:
        coding = request.headers.get("Content-Encoding", "").strip().lower()
        if coding not in CODINGS and request.body_exists:  # a proxy's header on a GET is no matter
            raise ApiError(415, f"Content-Encoding {coding!r} is not one this server undoes: send the body "
                                "as is, or gzip or deflate it", "unsupported_media_type")
        if request.content_length is not None and request.content_length > max_bytes:
            raise ApiError(413, f"the body is too large: {request.content_length} bytes declared, over "
                                f"max_upload_mb ({max_bytes} bytes)", "payload_too_large")
        return await handler(request)

    return limits


class BadHttpInOneLine(logging.Filter):
    """aiohttp answers a request that is not valid HTTP itself (a header line over 8 KB, a body
    unlike its Content-Length, a Content-Encoding it cannot undo: a plain-text 400, before any
    handler) and logs it with a traceback. It is the client's error: one line is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, web.RequestPayloadError):  # the rest of a body that failed a handler,
            error = error.__cause__  # read by aiohttp after the answer (gzip that is not gzip)
        if not isinstance(error, HttpProcessingError):
            return True
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else None
        _log.warning("bad_http_request", remote=remote, status=error.code, error=error.message or str(error))
        return False


def quiet_bad_http() -> None:
    """Once: aiohttp's own log of requests that are not valid HTTP, as one line each."""
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, BadHttpInOneLine) for f in server.filters):
        server.addFilter(BadHttpInOneLine())


def require_token(control: ControlSettings, open_handlers: set[Handler]) -> Callable:
    """Every route needs a configured token (constant-time compare) but those declared open
    (`open_handlers`: the probes, /metrics, and the live page, which holds no data and asks
    for the token itself); a named token's name is kept on the request as `token_name`."""
    accepted = [(name, tok.encode()) for name, tok in control.tokens.items() if tok]
    if control.token:
        accepted.append(("", control.token.encode()))

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if accepted:
            scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
            # the scheme is case-insensitive (RFC 9110), the token is not
            given = credentials.strip().encode() if scheme.lower() == "bearer" else b""
            # Compare with every token, always: the time taken says nothing of which matched.
            matches = [name for name, expected in accepted if hmac.compare_digest(given, expected)]
            if request.match_info.handler in open_handlers:  # open: it may say less to a stranger
                if matches:
                    request[TOKEN_NAME] = matches[0]
                return await handler(request)
            if not matches:
                refused = error_response(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
                refused.headers["WWW-Authenticate"] = 'Bearer realm="sightstream"'  # RFC 9110: a 401 names it
                return refused
            request[TOKEN_NAME] = matches[0]
        return await handler(request)

    return auth
