"""`/openapi.json` (OpenAPI 3.1), assembled from the operations the resource modules register:
their query, body and response models are the ones that validate requests (control/api.py).
pydantic's JSON Schema is the dialect OpenAPI 3.1 uses, so the models' schemas go in as they
are, under components/schemas."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from sightstream import __version__
from sightstream.control.api import Api, Operation, Resp
from sightstream.control.state import OPENAPI

REF = "#/components/schemas/{model}"


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    """Every error: a short code and a sentence."""

    error: ErrorDetail


ERRORS = {
    400: "Bad request (not JSON, or an unreadable upload)",
    401: "Missing or wrong bearer token",
    404: "Not found",
    422: "A field or parameter is invalid: the message names it",
}


def document(
    apis: list[Api], *, token: bool, path_values: dict[str, list[str]] | None = None
) -> dict[str, Any]:
    """The document. `path_values`: the values a path parameter takes on this daemon (its
    pipelines, the catalogue's families and variants): any other answers 404."""
    ops = [op for api in apis for op in api.operations]
    wanted: list[tuple[type[BaseModel], Any]] = [(ErrorBody, "serialization")]
    for op in ops:
        if op.body:
            wanted.append((op.body, "validation"))
        wanted += [(model, "serialization") for r in op.responses.values() for model in r.models]
    refs, defs = models_json_schema(list(dict.fromkeys(wanted)), ref_template=REF)
    schemas = defs.get("$defs", {})

    def ref(model: type[BaseModel], mode: str) -> dict[str, Any]:
        return refs[(model, mode)]  # type: ignore[index]

    paths: dict[str, dict[str, Any]] = {}
    for op in ops:
        operation = _operation(op, ref, token, path_values or {})
        paths.setdefault(documented(op.path), {})[op.method.lower()] = operation
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "sightstream control plane",
            "version": __version__,
            "description": "Prompts, jobs, one-off inference, models, pipelines and health of a "
                           "sightstream daemon. Errors are {\"error\": {\"code\", \"message\"}}.",
        },
        "paths": paths,
        "components": {"schemas": schemas},
        "tags": [{"name": api.tag} for api in apis if api.operations],
    }
    if token:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc


def _operation(
    op: Operation, ref: Any, token: bool, path_values: dict[str, list[str]]
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "summary": op.summary,
        "operationId": f"{op.method.lower()}_"
                       f"{re.sub(r'[^a-z0-9]+', '_', documented(op.path).lower()).strip('_')}",
        "tags": [op.tag],
    }
    params = [{"name": name, "in": "path", "required": True, "schema": _path_schema(path_values.get(name))}
              for name in re.findall(r"{(\w+)(?::[^}]+)?}", op.path)]
    if op.query:
        schema = op.query.model_json_schema(ref_template=REF)
        required = set(schema.get("required", ()))
        for name, prop in schema.get("properties", {}).items():
            param: dict[str, Any] = {"name": name, "in": "query", "required": name in required,
                                     "schema": {k: v for k, v in prop.items() if k != "description"}}
            if "description" in prop:
                param["description"] = prop["description"]
            params.append(param)
    params += [{"name": name, "in": "header", "required": False, "description": description,
                "schema": {"type": "string", "minLength": 1, "maxLength": 255}}
               for name, description in op.headers.items()]
    if params:
        out["parameters"] = params
    content: dict[str, Any] = {}
    if op.body:
        content["application/json"] = {"schema": ref(op.body, "validation")}
    if op.body_media:
        content.update({media: {"schema": schema} for media, schema in op.body_media.items()})
    if content:
        out["requestBody"] = {"required": True, "content": content}
    responses: dict[str, Any] = {str(s): _response(r, ref) for s, r in sorted(op.responses.items())}
    implied = set()
    if op.body or op.body_media:
        implied |= {400, 422}
    if op.query:
        implied.add(422)
    if token and not op.open:
        implied.add(401)
    for status in sorted(implied - set(op.responses)):
        responses[str(status)] = _response(Resp(ERRORS[status], ErrorBody), ref)
    out["responses"] = responses
    if op.open and token:
        out["security"] = []
    return out


def documented(path: str) -> str:
    """aiohttp's `{name:regex}` path parameters as OpenAPI's `{name}`."""
    return re.sub(r"{(\w+):[^}]+}", r"{\1}", path)


def _path_schema(values: list[str] | None) -> dict[str, Any]:
    return {"type": "string", "enum": sorted(set(values))} if values else {"type": "string"}


def _response(r: Resp, ref: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"description": r.description}
    schemas = [ref(model, "serialization") for model in r.models]
    content: dict[str, Any] = {}
    if schemas:
        content[r.media] = {"schema": schemas[0] if len(schemas) == 1 else {"oneOf": schemas}}
    elif r.media != "application/json":
        content[r.media] = {"schema": {"type": "string", "contentMediaType": r.media}}
    content.update({media: {"schema": {"type": "string", "contentMediaType": media}} for media in r.binary})
    if content:
        out["content"] = content
    if r.headers:
        out["headers"] = {name: {"description": d, "schema": {"type": "string"}}
                          for name, d in r.headers.items()}
    return out


def error(description: str) -> Resp:
    """A documented error response."""
    return Resp(description, ErrorBody)


api = Api("schema")


@api.get("/openapi.json", "This document",
         responses={200: Resp("The OpenAPI 3.1 description of every route")})
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])
