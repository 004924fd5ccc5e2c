"""Jobs: a video (HLS live or VOD, an MP4 over HTTP, a file) or a Redis stream to analyse.
Submitted here, stored in Redis (jobs/store.py), run by whichever daemon takes its lease
(jobs/runner.py), its results read back page by page."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sightstream.config import DEFAULT_MODEL
from sightstream.control.api import JSON_NUMBER, Api, ApiError, Resp, read_json, read_query, who
from sightstream.control.models import model_error
from sightstream.control.openapi import error
from sightstream.control.state import DAEMON, reply
from sightstream.daemon.daemon import Daemon
from sightstream.errors import ModelError
from sightstream.jobs.sources import SourceRefused, check_source
from sightstream.jobs.store import STATUSES, Job, JobSpec, KeyReused
from sightstream.jobs.summaries import check_summarizer
from sightstream.jobs.summary import SummaryFailed, instruction_for
from sightstream.models.adapters import adapter_class
from sightstream.prompts import PromptBook

api = Api("jobs")
ENTRY_ID = re.compile(r"^\d+(-\d+)?$")
JOB_ID = re.compile(r"^[0-9a-f]{20}$")
LAST_ID = f"{2**64 - 1}-{2**64 - 1}"  # Redis refuses an exclusive range after it
BINARY_FIELDS = ("mask", "depth")


class SummarizeIn(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str = Field(pattern=r"^[^/\s]+/[^/\s]+$", description=(
        "a text generation model (task generate), family/variant: it writes the summary from the "
        "per-frame results"))
    prompt: str = Field("", max_length=10_000,
                        description="the instruction (default: summarise what happens)")
    every_s: Annotated[float, Field(ge=1, le=10**7), JSON_NUMBER] | None = Field(None, description=(
        "also, every every_s while the job runs, a summary of the results since the previous one (live "
        "sources); the whole job is summarised when it has read its source to the end"))


class Summary(BaseModel):
    text: str
    from_s: float | None = Field(description="the first result's time: into the video, or Unix seconds")
    to_s: float | None
    lines: int = Field(description="results summarised")
    windows: int = Field(description="calls of the text model for the first level (context windows)")
    levels: int = Field(description="1: one window; more: summaries of summaries")
    final: bool = Field(description="the whole job's, written when it ended; else a periodic one")
    model: str
    created_at: float


class JobIn(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    source: str = Field(min_length=1, max_length=4096, description=(
        "https://…/live.m3u8 (HLS, live or VOD), https://…/clip.mp4, rtsp(s)://… (a camera), file:///… "
        "(under jobs.allowed_paths), or redis://<stream key>"))
    model: str = Field(DEFAULT_MODEL, pattern=r"^[^/\s]+/[^/\s]+$", description="family/variant")
    fps: Annotated[float, Field(gt=0, le=240), JSON_NUMBER] = Field(1.0, description=(
        "results per second of video (per second of capture time for a stream)"))
    prompt: str = Field("", max_length=100_000)
    max_frames: Annotated[int, Field(ge=1, le=10**9), JSON_NUMBER] | None = Field(
        None, description="stop after this many frames (results and dead-lettered)")
    max_seconds: Annotated[float, Field(gt=0, le=10**7), JSON_NUMBER] | None = Field(None, description=(
        "stop after this much video (a stream: this long after the job started)"))
    summarize: SummarizeIn | None = Field(None, description=(
        "write a summary of the whole job from its results with a text model (results stream: an "
        "entry with task summary; GET /jobs/{id}: summary)"))
    # A user's job whose video gives no frame for jobs.give_up_s fails.


IDEMPOTENCY_KEY = "Idempotency-Key"


class Created(BaseModel):
    job_id: str
    status: str
    results_stream: str


class Counts(BaseModel):
    decoded: int = 0
    sampled: int = 0
    processed: int = Field(0, description="results published")
    dead_lettered: int = 0
    summaries: int = Field(0, description="summaries written")


class Progress(BaseModel):
    position_s: float | None = None
    duration_s: float | None = Field(None, description="null for live sources")
    fraction: float | None = Field(None, description="of a VOD, 0 to 1")
    last_error: str | None = Field(None, description="why the source was last reopened, if it was, or what "
                                   "of an HLS video was skipped (a segment that could not be fetched, or a "
                                   "live stream's part that went by while it was reopened)")
    skipped_s: float = Field(0, description="seconds of an HLS video the reader jumped over, all attempts "
                             "together: 0 when the video was read whole")
    last_frame_at: str | None = Field(None, description="when the source last gave a frame (ISO 8601 UTC): "
                                      "a camera that is down has a last_error and an old last_frame_at")


class Timings(BaseModel):
    open_s: float = Field(0, description="opening and downloading (playlists, probing)")
    decode_s: float = Field(0, description="demuxing and decoding")
    infer_s: float = Field(0, description="time the job waited on the model's results (batching, "
                                          "queueing, inference), not overlapped with reading")
    total_s: float = 0


class JobOut(BaseModel):
    job_id: str
    status: Literal["pending", "running", "completed", "failed", "cancelled"]
    source: str
    model: str
    fps: float
    prompt: str = Field(description="a pipeline's video input: the pipeline's prompt now")
    max_frames: int | None
    max_seconds: float | None
    results_stream: str
    attempt: int = Field(description="how many times a daemon started it (more: resumed after a death)")
    holder: str = Field(description="the daemon (consumer name) running it, or that ran it last")
    waiting: str | None = Field(None, description="a pending job: why a daemon that saw it left it to "
                                "others (its config lacks the model, or does not allow the source)")
    created_by: str
    created_at: str
    started_at: str | None
    finished_at: str | None
    error: str
    counts: Counts
    progress: Progress
    timings: Timings
    summarize: SummarizeIn | None = None
    summary: Summary | None = Field(None, description="the latest summary written")


class JobList(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null: no more")


class ListQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")
    status: Literal["pending", "running", "completed", "failed", "cancelled"] | None = None
    limit: int = Field(50, ge=1, le=1000)
    cursor: str | None = Field(None, pattern=JOB_ID.pattern)


class ResultsQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")
    after: str | None = Field(None, pattern=ENTRY_ID.pattern,
                              description="an entry ID: results after it (default: from the start)")
    count: int = Field(100, ge=1, le=1000)

    @field_validator("after")
    @classmethod
    def _in_range(cls, v: str | None) -> str | None:
        if v is not None and any(int(part) >= 2**64 for part in v.split("-")):
            raise ValueError("is not a stream entry ID (each part below 2^64)")
        return v


class ResultEntry(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    fields: dict[str, Any] = Field(description="as in result streams; `result` parsed, PNGs in base64")


class ResultsPage(BaseModel):
    job_id: str
    status: str
    results: list[ResultEntry]
    next_after: str | None = Field(description="pass as ?after= for the next page")
    done: bool = Field(description="the job has ended and this page reached its last result")


class Cancelled(BaseModel):
    job_id: str
    status: str


NO_JOB = error("No such job (or it expired: jobs.ttl_s after it ended)")


def _out(job: Job, prompts: PromptBook | None) -> JobOut:
    spec = job.spec
    prompt = spec.prompt
    if spec.pipeline and prompts is not None and spec.pipeline in prompts.pipelines:
        prompt = prompts.current(spec.pipeline).text  # a video input runs with its pipeline's
    return JobOut(
        job_id=job.id, status=job.status, source=spec.shown, model=spec.model,  # type: ignore[arg-type]
        fps=spec.fps, prompt=prompt, max_frames=spec.max_frames, max_seconds=spec.max_seconds,
        results_stream=job.results_stream, attempt=job.attempt, holder=job.holder,
        waiting=job.waiting if job.status == "pending" and job.waiting else None,
        created_by=spec.created_by, created_at=job.created_at, started_at=job.started_at,
        finished_at=job.finished_at, error=job.error, counts=Counts(**job.counts),
        progress=Progress(**job.progress), timings=Timings(**job.timings),
        summarize=SummarizeIn(**spec.summarize) if spec.summarize else None,
        summary=Summary(**job.summary) if job.summary else None,
    )


async def _job(request: web.Request) -> Job:
    job_id = request.match_info["id"]
    job = await request.app[DAEMON].jobs.get(job_id) if JOB_ID.match(job_id) else None
    if job is None:
        raise ApiError(404, f"no job {job_id!r}")
    return job


@api.post("/jobs", "Submit a video or stream to analyse",
          body=JobIn,
          headers={IDEMPOTENCY_KEY: "any text (a UUID) naming this submission: sent again with the "
                                    "same body (byte for byte) and token, it answers the job the first "
                                    "try made (200), never a second job. Kept for jobs.ttl_s after the "
                                    "first try"},
          responses={201: Resp("Accepted: it runs on whichever daemon takes it", Created,
                               headers={"Location": "/jobs/<job_id>"}),
                     200: Resp("A retry of a submission with the same Idempotency-Key: its job", Created,
                               headers={"Location": "/jobs/<job_id>", "Idempotent-Replayed": "true"}),
                     404: error("No such model"),
                     409: error("The model's weights are not on this machine, or the Idempotency-Key "
                                "was used for another request"),
                     422: error("A field is invalid, the source is refused, or the prompt does not "
                                "suit the model")})
async def submit(request: web.Request) -> web.Response:
    d = request.app[DAEMON]
    raw = await request.read()
    body = await read_json(request, JobIn)
    key = request.headers.get(IDEMPOTENCY_KEY)
    submission = None
    if key is not None:
        if not 1 <= len(key) <= 255:
            raise ApiError(422, f"{IDEMPOTENCY_KEY}: 1 to 255 characters")
        # Scoped to the token (two clients may pick the same key), and to the exact body.
        submission = (f"{who(request)}\0{key}", hashlib.sha256(raw).hexdigest()[:32])
        try:  # a retry answers the first try's job, whatever changed since (a model unloaded, …)
            if (earlier := await d.jobs.replayed(*submission)) is not None:
                return _created(earlier, replayed=True)
        except KeyReused as e:
            raise _reused(e) from None
    try:  # in a thread: file sources are looked up on disk
        source = await asyncio.get_running_loop().run_in_executor(None, check_source, body.source,
                                                                  d.settings.jobs)
    except SourceRefused as e:
        raise ApiError(422, f"source: {e}") from None
    kind: Any = await d.client.type(source.location) if source.is_stream else b"stream"
    if kind not in (b"stream", b"none"):
        raise ApiError(422, f"source: {source.location} holds a {kind.decode()}, not a stream of frames")
    loop = asyncio.get_running_loop()
    try:
        entry = d.catalogue.get(body.model)
        # its weights are here (a hub id is looked up in the local cache) and its options make sense
        await loop.run_in_executor(None, d.manager.create, body.model)
    except ModelError as e:
        raise model_error(e) from None
    if body.prompt or getattr(adapter_class(entry.adapter), "takes_prompt", False):
        if (why := await d.manager.prompt_refusal(body.model, body.prompt)) is not None:
            raise ApiError(422, f"prompt: {body.model} cannot use it: {why}")
    if entry.task == "generate":
        raise ApiError(422, f"model: {body.model} writes text from text; name it in summarize.model, and a "
                            "model that reads frames in model")
    if body.summarize is not None:
        await _check_summarize(d, body, entry.task, source.always_live)
    spec = JobSpec(body.source, body.model, body.fps, body.prompt, body.max_frames, body.max_seconds,
                   who(request), summarize=body.summarize.model_dump() if body.summarize else None)
    if submission is None:
        job, new = await d.jobs.create(spec), True
    else:
        try:
            job, new = await d.jobs.create_once(spec, *submission)
        except KeyReused as e:
            raise _reused(e) from None
    return _created(job, replayed=not new)


def _reused(e: KeyReused) -> ApiError:
    return ApiError(409, f"{IDEMPOTENCY_KEY} {e}", "idempotency_key_reused")


def _created(job: Job, replayed: bool) -> web.Response:
    headers = {"Location": f"/jobs/{job.id}", **({"Idempotent-Replayed": "true"} if replayed else {})}
    return reply(Created(job_id=job.id, status=job.status, results_stream=job.results_stream),
                 200 if replayed else 201, headers=headers)


async def _check_summarize(d: Daemon, body: JobIn, task: str, always_live: bool) -> None:
    """The summary can be written: a text model with room for the instruction, results it can
    read, and an end to the job (or periodic summaries). Raises ApiError."""
    spec = body.summarize
    assert spec is not None
    if task == "depth":
        raise ApiError(422, f"summarize: {body.model} gives depth maps, which say nothing a summary can use")
    if always_live and not (body.max_seconds or body.max_frames or spec.every_s):
        raise ApiError(422, "summarize: a job of a stream or a camera ends only when cancelled, and a "
                            "cancelled job gets no summary: set max_seconds or max_frames, or "
                            "summarize.every_s")
    try:
        summarizer = d.catalogue.get(spec.model)
        await asyncio.get_running_loop().run_in_executor(None, summarizer.resolve)
    except ModelError as e:
        raise model_error(e) from None
    if summarizer.task != "generate":
        raise ApiError(422, f"summarize.model: {spec.model} does not write text (its task is "
                            f"{summarizer.task}); use a text generation model (task generate)")
    try:  # reads the tokenizer and config from disk
        await asyncio.get_running_loop().run_in_executor(
            None, check_summarizer, d.manager.create, spec.model, instruction_for(spec.prompt, body.prompt))
    except (ModelError, SummaryFailed) as e:
        raise ApiError(422, f"summarize.model: {e}") from None


@api.get("/jobs", "Jobs, newest first (?status=, ?limit=, ?cursor=)", query=ListQuery,
         responses={200: Resp("A page of jobs", JobList)})
async def list_jobs(request: web.Request) -> web.Response:
    q = read_query(request, ListQuery)
    jobs, cursor = await request.app[DAEMON].jobs.page(q.status, q.limit, q.cursor)
    book = request.app[DAEMON].prompt_book
    return reply(JobList(jobs=[_out(j, book) for j in jobs], next_cursor=cursor))


@api.get("/jobs/{id}", "A job: status, counts, progress, timings, error",
         responses={200: Resp("The job", JobOut), 404: NO_JOB})
async def get_job(request: web.Request) -> web.Response:
    return reply(_out(await _job(request), request.app[DAEMON].prompt_book))


@api.get("/jobs/{id}/results", "A page of a job's results (?after=<entry id>, ?count=)",
         query=ResultsQuery, responses={200: Resp("A page of results", ResultsPage), 404: NO_JOB})
async def results(request: web.Request) -> web.Response:
    job = await _job(request)
    q = read_query(request, ResultsQuery)
    entries: Any = [] if q.after == LAST_ID else await request.app[DAEMON].client.xrange(
        job.results_stream, f"({q.after}" if q.after else "-", "+", count=q.count)
    page = [ResultEntry(id=i.decode(), fields=_fields(f)) for i, f in entries]
    next_after = page[-1].id if page else q.after
    return reply(ResultsPage(job_id=job.id, status=job.status, results=page, next_after=next_after,
                             done=job.status in STATUSES[2:] and len(page) < q.count))


@api.delete("/jobs/{id}", "Cancel a job (it stops within a second)",
            responses={200: Resp("Cancelled", Cancelled), 404: NO_JOB,
                       409: error("The job has already ended (code conflict)")})
async def cancel(request: web.Request) -> web.Response:
    job_id = request.match_info["id"]
    job = await _job(request)
    if job.spec.pipeline:
        raise ApiError(409, f"job {job_id} reads an input of pipeline {job.spec.pipeline}: remove it from "
                            "the pipeline's input in the config instead", "conflict")
    before = await request.app[DAEMON].jobs.cancel(job_id)
    if not before:
        raise ApiError(404, f"no job {job_id!r}")
    if before not in ("pending", "running"):
        raise ApiError(409, f"job {job_id} has already ended ({before})", "conflict")
    # counted here, by the daemon that ended it: its runner (maybe on another daemon) only stops
    request.app[DAEMON].metrics.jobs_finished.labels("cancelled").inc()
    return reply(Cancelled(job_id=job_id, status="cancelled"))


def _fields(raw: dict[bytes, bytes]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in raw.items():
        name = k.decode()
        if name in BINARY_FIELDS:
            out[name] = base64.b64encode(v).decode()
        elif name in ("result", "meta"):
            out[name] = json.loads(v)
        else:
            out[name] = v.decode(errors="replace")
    return out
