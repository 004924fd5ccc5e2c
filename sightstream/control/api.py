"""Routes that describe themselves. Each handler is registered with the pydantic models of its
query, body and responses; the same models validate requests here, and `/openapi.json` is
assembled from them (control/openapi.py): there is no second, hand-written schema to drift."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, BeforeValidator, ValidationError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
M = TypeVar("M", bound=BaseModel)
# The name of the bearer token a request came with ("" for the unnamed `token`, or no auth).
TOKEN_NAME = web.RequestKey("token_name", str)


def _a_json_number(value: Any) -> Any:
    """pydantic reads true as 1 and "5" as 5: a client's mistake (a flag sent for a count, a
    form's text), not a number."""
    if isinstance(value, (bool, str)):
        sent = "true or false" if isinstance(value, bool) else "text"
        raise ValueError(f"a JSON number is wanted here, not {sent}")
    return value


# A number in a request body: a JSON number (5.0 is an integer, as JSON Schema has it), never a
# bool or text. Bounds go before it in the same Annotated, so the schema shows them as
# minimum/maximum: Annotated[int, Field(ge=1), JSON_NUMBER].
JSON_NUMBER = BeforeValidator(_a_json_number)


def who(request: web.Request) -> str:
    return request.get(TOKEN_NAME, "")


class ApiError(Exception):
    """Answered as {"error": {"code", "message"}} with `status` (control/errors.py)."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}


@dataclass(frozen=True)
class Resp:
    """One documented response: a JSON model, or another media type (an image, bytes)."""

    description: str
    model: type[BaseModel] | tuple[type[BaseModel], ...] | None = None  # several: one of them
    media: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)  # name -> description
    binary: tuple[str, ...] = ()  # other media types it may answer with, as bytes (an image)

    @property
    def models(self) -> tuple[type[BaseModel], ...]:
        return self.model if isinstance(self.model, tuple) else (self.model,) if self.model else ()


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    query: type[BaseModel] | None
    body: type[BaseModel] | None
    # Bodies that are not one JSON model: media type -> JSON Schema (uploads, images, tars)
    body_media: dict[str, dict[str, Any]] | None
    responses: dict[int, Resp]
    open: bool  # served without the bearer token (the probes, metrics, the live page)
    headers: dict[str, str] = field(default_factory=dict)  # request headers it reads -> description


class Api:
    """The routes of one resource module, with what the schema needs to know of each."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.operations: list[Operation] = []

    def route(
        self, method: str, path: str, summary: str, *, query: type[BaseModel] | None = None,
        body: type[BaseModel] | None = None, body_media: dict[str, dict[str, Any]] | None = None,
        responses: dict[int, Resp] | None = None, open: bool = False, headers: dict[str, str] | None = None,
    ) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            self.operations.append(Operation(
                method, path, handler, summary, self.tag, query, body, body_media,
                responses or {200: Resp("OK")}, open, dict(headers or {}),
            ))
            return handler

        return register

    def get(self, path: str, summary: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.route("GET", path, summary, **kw)

    def post(self, path: str, summary: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.route("POST", path, summary, **kw)

    def put(self, path: str, summary: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.route("PUT", path, summary, **kw)

    def delete(self, path: str, summary: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.route("DELETE", path, summary, **kw)

    def add_to(self, app: web.Application) -> None:
        for op in self.operations:
            if op.method == "GET":  # with HEAD, as a load balancer's probe may ask
                app.router.add_get(op.path, op.handler)
            else:
                app.router.add_route(op.method, op.path, op.handler)


def describe(e: ValidationError, where: str = "") -> str:
    """One sentence per problem, naming the field as the user sent it."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}{loc}: {msg}" if loc else f"{where.rstrip('.: ') or 'body'}: {msg}")
    return "; ".join(parts)


async def read_json(request: web.Request, model: type[M]) -> M:
    """The body, validated: 400 when it is not JSON, 422 naming each field that is wrong."""
    raw = await request.read()
    if not raw.strip():
        raise ApiError(400, "the body is empty: send a JSON object")
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        if any(err["type"] == "json_invalid" for err in e.errors()):
            raise ApiError(400, "the body is not valid JSON") from None
        raise ApiError(422, describe(e)) from None


def read_query(request: web.Request, model: type[M]) -> M:
    """The query string, validated: 422 naming each parameter that is wrong."""
    try:
        return model.model_validate(dict(request.query))
    except ValidationError as e:
        raise ApiError(422, describe(e, "query parameter ")) from None
