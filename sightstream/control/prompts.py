"""Prompts: versioned, shared by every daemon through Redis (sightstream/prompts.py), in effect
on every daemon within a second. A change may be conditional on the version it was based on
(`If-Match: <version>` or `expected_version`): 409 when someone else changed it first."""

from __future__ import annotations

from typing import Annotated

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from sightstream.config import PipelineSettings
from sightstream.control.api import JSON_NUMBER, Api, ApiError, Resp, read_json, read_query, who
from sightstream.control.openapi import error
from sightstream.control.state import DAEMON, reply
from sightstream.daemon.daemon import Daemon
from sightstream.prompts import PromptVersion, UnknownVersion, VersionConflict

api = Api("prompts")
MAX_PROMPT = 100_000  # characters
MAX_VERSION = 2**31 - 1


class PromptOut(BaseModel):
    pipeline: str
    text: str
    version: int
    updated_at: str | None = Field(None, description="ISO 8601 UTC; null: the configured prompt")
    set_by: str = Field("", description="the bearer token's name; config for version 1; empty for the "
                        "unnamed control.token, or no token")
    rolled_back_from: int | None = None
    lost: bool = Field(False, description="its text was lost with Redis's data (a restart without "
                       "persistence): a daemon wrote the current version back, keeping its number")


class PromptHistory(BaseModel):
    pipeline: str
    versions: list[PromptOut] = Field(description="newest first")
    next_before: int | None = Field(None, description="?before= for the next, older page; null: no older one")


class HistoryQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")
    limit: int = Field(100, ge=1, le=1000, description="versions per page, newest first")
    before: int | None = Field(None, ge=2, le=MAX_VERSION, description="only versions older than this one")


class PromptIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(max_length=MAX_PROMPT)
    expected_version: Annotated[int, Field(ge=1, le=MAX_VERSION), JSON_NUMBER] | None = Field(
        None,
        description="refuse (409) unless this is the current version (as If-Match)")


class RollbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: Annotated[int, Field(ge=1, le=MAX_VERSION), JSON_NUMBER] = Field(
        description="the version whose text becomes current again")
    expected_version: Annotated[int, Field(ge=1, le=MAX_VERSION), JSON_NUMBER] | None = None


NO_PIPELINE = error("No pipeline of that name in this daemon's config")
CONFLICT = error("The prompt changed since the expected version (code conflict)")
IF_MATCH = {"ETag": "the version, quoted"}


def _pipeline(request: web.Request) -> PipelineSettings:
    name = request.match_info["name"]
    for p in request.app[DAEMON].settings.pipelines:
        if p.name == name:
            return p
    raise ApiError(404, f"no pipeline named {name!r}")


def _out(pipeline: str, p: PromptVersion) -> PromptOut:
    return PromptOut(pipeline=pipeline, text=p.text, version=p.version, updated_at=p.updated_at,
                     set_by=p.set_by, rolled_back_from=p.rolled_back_from, lost=p.lost)


def _answer(pipeline: str, p: PromptVersion) -> web.Response:
    return reply(_out(pipeline, p), headers={"ETag": f'"{p.version}"'})


async def _check_usable(d: Daemon, p: PipelineSettings, text: str, what: str) -> None:
    """422 unless the pipeline's model can use this prompt text (`what` names it)."""
    if (why := await d.manager.prompt_refusal(p.model, text, chained=bool(p.prompt_from))) is not None:
        raise ApiError(422, f"{p.model} cannot use {what}: {why}")


def _expected(request: web.Request, given: int | None) -> int | None:
    header = request.headers.get("If-Match", "").strip()
    if not header or header == "*":
        return given
    try:
        version = int(header.removeprefix("W/").strip('"'))
    except ValueError:
        version = 0
    if not 1 <= version <= MAX_VERSION:
        raise ApiError(400, 'If-Match must be a prompt version, e.g. If-Match: "3"')
    if given is not None and given != version:
        raise ApiError(400, f"If-Match says version {version} and expected_version says {given}: "
                            "send one of them")
    return version


@api.get("/pipelines/{name}/prompt", "The pipeline's current prompt",
         responses={200: Resp("The prompt", PromptOut, headers=IF_MATCH), 404: NO_PIPELINE})
async def get_prompt(request: web.Request) -> web.Response:
    p = _pipeline(request)
    return _answer(p.name, await request.app[DAEMON].prompts.get(p.name))


@api.put("/pipelines/{name}/prompt", "Set a new version of the prompt (If-Match: <version> optional)",
         body=PromptIn,
         responses={200: Resp("The new version (the current one, if it has this text already)", PromptOut,
                              headers=IF_MATCH), 404: NO_PIPELINE,
                    409: CONFLICT,
                    422: error("The pipeline's model cannot use this prompt: the message says why")})
async def put_prompt(request: web.Request) -> web.Response:
    p = _pipeline(request)
    body = await read_json(request, PromptIn)
    expected = _expected(request, body.expected_version)
    d = request.app[DAEMON]
    await _check_usable(d, p, body.text, "this prompt")
    try:
        changed = await d.prompts.set(p.name, body.text, expected=expected,
                                      set_by=who(request))
    except VersionConflict as e:
        raise ApiError(409, str(e), "conflict") from None
    return _answer(p.name, changed)


@api.get("/pipelines/{name}/prompt/history", "The prompt's versions, newest first, a page at a time",
         query=HistoryQuery,
         responses={200: Resp("The history", PromptHistory), 404: NO_PIPELINE})
async def history(request: web.Request) -> web.Response:
    p = _pipeline(request)
    q = read_query(request, HistoryQuery)
    versions, next_before = await request.app[DAEMON].prompts.history(p.name, q.limit, q.before)
    return reply(PromptHistory(pipeline=p.name, versions=[_out(p.name, v) for v in versions],
                               next_before=next_before))


@api.post("/pipelines/{name}/prompt/rollback", "Make an earlier version's text current (a new version)",
          body=RollbackIn,
          responses={200: Resp("The new version", PromptOut, headers=IF_MATCH), 404: NO_PIPELINE,
                     409: CONFLICT,
                     422: error("No such version, or the pipeline's model cannot use its prompt")})
async def rollback(request: web.Request) -> web.Response:
    p = _pipeline(request)
    body = await read_json(request, RollbackIn)
    expected = _expected(request, body.expected_version)
    d = request.app[DAEMON]
    # as PUT checks a new text: a version set for another model (the config changed since)
    earlier = await d.prompts.version(p.name, body.version)
    if earlier is not None and not earlier.lost:  # a lost one's refusal comes from the store
        await _check_usable(d, p, earlier.text, f"version {body.version}'s prompt")
    try:
        changed = await d.prompts.rollback(
            p.name, body.version, expected=expected, set_by=who(request))
    except VersionConflict as e:
        raise ApiError(409, str(e), "conflict") from None
    except UnknownVersion as e:
        raise ApiError(422, str(e)) from None
    return _answer(p.name, changed)
