"""One-off inference, Mozo-compatible: `POST /predict/{family}/{variant}`.

The image is the body (raw bytes), a multipart `file` field, or several: more than one `file`
part, or a WebDataset tar (`application/x-tar`), is a batch answered with one entry per image,
in order (`X-Batch-Size`). `Content-Encoding: gzip` bodies are accepted. Images are decoded in
the daemon's decode pool and go through the same batching and device workers as stream
frames (stages/adhoc.py), so a burst of requests is batched.

A text generation model (`task = "generate"`) takes UTF-8 text as the body instead, and
`?prompt=` as its instruction; it answers `{"text": "..."}`.

Answers: the task's result JSON (as in result streams); `?format=png` the mask or depth PNG
(the default for depth); `?format=packbits` the masks' union as a binary block (masks.py's
`packbits_frame`), length-prefixed per image in a batch.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import struct
import tarfile
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import LineTooLong
from pydantic import BaseModel, ConfigDict, Field

from sightstream.control.api import Api, ApiError, Resp, read_query
from sightstream.control.models import MODEL_ERRORS, model_error, model_id
from sightstream.control.openapi import error
from sightstream.control.state import DAEMON, PIXELS
from sightstream.daemon.daemon import Daemon
from sightstream.errors import FrameError, ModelError
from sightstream.frames import DeadLettered, Frame, Outcome, Published, now_ms
from sightstream.models import masks
from sightstream.models.adapters import adapter_class, check_prompt
from sightstream.models.catalogue import Entry
from sightstream.prompts import Prompt
from sightstream.stages.adhoc import ShuttingDown
from sightstream.stages.decoder import decode_image, image_pixels
from sightstream.stages.worker import InferenceTimeout

api = Api("predict")
TAR_TYPES = ("application/x-tar", "application/tar")
# A frame's problem -> the HTTP status it is answered with
FRAME_STATUS = {"unsupported_format": 415, "too_large": 413}


class PredictQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str | None = Field(None, max_length=4096,
                               description="for prompted models: labels to find, a question, SAM2 JSON")
    format: Literal["json", "png", "packbits"] | None = Field(
        None, description="json (default), png (masks, depth: the default for depth), packbits (masks)")


class PredictError(BaseModel):
    code: str
    message: str


class BatchItem(BaseModel):
    name: str
    result: dict[str, Any] | None = None
    error: PredictError | None = None
    mask: str | None = Field(None, description="the mask PNG, base64")
    depth: str | None = Field(None, description="the 16-bit depth PNG, base64")


class BatchResult(BaseModel):
    model: str
    task: str
    results: list[BatchItem]


class TaskResult(BaseModel):
    """The task's result JSON, as in result streams (docs/contract.md)."""

    model_config = ConfigDict(extra="allow")


BINARY = {"type": "string", "contentMediaType": "application/octet-stream", "minLength": 1}
BODIES = {
    "multipart/form-data": {"type": "object", "required": ["file"], "properties": {"file": {
        "anyOf": [BINARY, {"type": "array", "items": BINARY, "minItems": 1}],
        "description": "the image; several `file` parts are a batch"}}},
    "image/jpeg": BINARY, "image/png": BINARY, "image/webp": BINARY, "image/bmp": BINARY,
    "application/octet-stream": BINARY, "application/x-tar": BINARY,
    "text/plain": {"type": "string", "minLength": 1, "description": "the text, for a text generation model"},
}


@dataclass(slots=True)
class Upload:
    name: str
    data: bytes


@api.post(
    "/predict/{family}/{variant}", "Run a model on one image, or a batch (tar, several files)",
    query=PredictQuery, body_media=BODIES,
    responses={
        200: Resp("The task's result JSON (TaskResult); a batch: one entry per image (BatchResult). "
                  "?format=png: the mask or depth PNG (the default for depth); ?format=packbits: the "
                  "masks as bits (docs/http.md)", (TaskResult, BatchResult),
                  headers={"X-Model": "the model, family/variant", "X-Task": "its task",
                           "X-Batch-Size": "images in a batch",
                           "X-Depth-Min": "depth PNG: the depth its pixel value 0 stands for",
                           "X-Depth-Max": "depth PNG: the depth its pixel value 65535 stands for"},
                  binary=("image/png", "application/octet-stream")),
        **MODEL_ERRORS,
        400: error("No image in the request, or a malformed upload"),
        413: error("The body is over max_upload_mb, or the image over decode.max_pixels"),
        415: error("Not a JPEG, PNG, WebP or BMP image"),
        422: error("The image cannot be decoded, the prompt does not suit the model, or the model failed"),
        503: error("The daemon is starting, or stopping"),
        504: error("The model did not answer within its timeout (inference_timeout_s, or its own timeout_s)"),
    },
)
async def predict(request: web.Request) -> web.StreamResponse:
    d = request.app[DAEMON]
    query = read_query(request, PredictQuery)
    prompt = query.prompt if query.prompt and query.prompt.strip() else None  # blank: no prompt
    mid = model_id(request)
    # A path's model is a metric label only once the catalogue knows it (the label set stays bounded).
    label = mid if mid in d.catalogue else "unknown"
    status = 500
    try:
        if d.adhoc is None:
            raise ApiError(503, "the daemon is starting (waiting for Redis): try again shortly",
                           "unavailable")
        entry = _model(d, mid, prompt)
        if entry.task == "generate":
            if query.format not in (None, "json"):
                raise ApiError(422, f"format={query.format}: {mid} writes text; use json", "bad_format")
            response = await _generate(request, d, entry, prompt)
            status = response.status
            return response
        uploads, batch = await _uploads(request, d)
        outcomes: dict[int, Outcome] = {}
        errors: dict[int, ApiError] = {}
        # A chunk at a time: a batch of large images is never all decoded at once, and all
        # requests together hold at most control.predict_max_pixels (control/pixel_budget.py).
        chunk = d.settings.control.predict_batch_size
        loop = asyncio.get_running_loop()
        for start in range(0, len(uploads), chunk):
            part = uploads[start:start + chunk]
            pixels = await asyncio.gather(*(loop.run_in_executor(d.decode_pool, image_pixels, u.data)
                                            for u in part))
            async with request.app[PIXELS].hold(sum(pixels)):
                frames, failed = await _decode(d, mid, part, start)
                errors |= failed
                done = await _infer(d, entry, frames, prompt)
                for outcome in done.values():  # the answer needs the fields only: free the pixels now
                    outcome.frame.image = None
                outcomes |= done
                del frames
        for i, outcome in outcomes.items():
            if isinstance(outcome, DeadLettered):
                errors[i] = ApiError(422, outcome.error, "model_error")
        fmt = query.format or ("png" if entry.task == "depth" and not batch else "json")
        if batch:
            response = await _batch_answer(d, entry, uploads, outcomes, errors, fmt)
        elif errors:
            raise errors[0]
        else:
            published = outcomes[0]
            assert isinstance(published, Published)
            response = await _answer(d, entry, published, fmt)
        status = response.status
        return response
    except (ApiError, web.HTTPException) as e:
        status = e.status
        raise
    finally:
        d.metrics.predict_requests.labels(label, str(status)).inc()


def _model(d: Daemon, mid: str, prompt: str | None) -> Entry:
    try:
        entry = d.catalogue.get(mid)
        if entry.task == "track":
            raise ApiError(422, f"{mid} tracks objects across a source's frames: send it a video as a "
                                "job (POST /jobs), or frames through a pipeline", "bad_model")
        takes_prompt = getattr(adapter_class(entry.adapter), "takes_prompt", False)
        entry.resolve()
        if not d.manager.is_loaded(mid):  # 507 at once, as POST …/load says, not a model_error
            d.manager.check_fits(mid, d.devices)
    except ModelError as e:
        raise model_error(e) from None
    if prompt or takes_prompt:  # a blank ?prompt= is no prompt, also for a model that takes none
        try:
            check_prompt(entry.adapter, entry.task, prompt or "")
        except ModelError as e:
            raise ApiError(422, f"{mid} cannot use this prompt: {e}") from None
    return entry


async def _generate(request: web.Request, d: Daemon, entry: Entry, prompt: str | None) -> web.Response:
    """A text generation model: the body, or a multipart `file` field, is the text (UTF-8);
    `?prompt=` the instruction."""
    if request.content_type == "multipart/form-data":
        files = await _multipart(request, d.settings.control.predict_max_images,
                                 d.settings.control.max_upload_bytes)
        if len(files) > 1:
            raise ApiError(400, f"{entry.id} takes one text: send one `file` field, not {len(files)}")
        body = files[0].data
    else:
        body = await request.read()  # over client_max_size: 413
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise ApiError(400, "a text generation model takes UTF-8 text as the body") from None
    if not text.strip():
        raise ApiError(400, f"{entry.id} writes text from text: send the text as the body (text/plain)")
    frame = Frame("predict", "text", "0", {}, now_ms(), text=text)
    outcome = (await _infer(d, entry, [frame], prompt))[0]
    if isinstance(outcome, DeadLettered):
        raise ApiError(422, outcome.error, "model_error")
    assert isinstance(outcome, Published)
    return await _answer(d, entry, outcome, "json")


async def _uploads(request: web.Request, d: Daemon) -> tuple[list[Upload], bool]:
    """The images sent, and whether they are a batch (a tar, or several multipart files)."""
    limit = d.settings.control.predict_max_images
    if request.content_type == "multipart/form-data":
        uploads = await _multipart(request, limit, d.settings.control.max_upload_bytes)
        return uploads, len(uploads) > 1
    body = await request.read()  # over client_max_size: 413
    if not body:
        raise ApiError(400, "no image: send it as the body, or as a multipart `file` field")
    if request.content_type in TAR_TYPES:
        members = await asyncio.get_running_loop().run_in_executor(
            d.decode_pool, _untar, body, limit, d.settings.control.max_upload_bytes)
        return members, True
    return [Upload("image", body)], False


async def _multipart(request: web.Request, limit: int, max_bytes: int) -> list[Upload]:
    try:
        reader = await request.multipart()
        uploads: list[Upload] = []
        total = 0
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or part.name != "file":
                continue
            chunks = []
            while chunk := await part.read_chunk():
                total += len(chunk)
                if total > max_bytes:
                    raise ApiError(413, f"the body is too large: over max_upload_mb ({max_bytes} bytes)")
                chunks.append(chunk)
            uploads.append(Upload(part.filename or f"file{len(uploads)}",
                                  _transfer_decoded(part, b"".join(chunks))))
            if len(uploads) > limit:
                raise ApiError(413, f"more than predict_max_images ({limit}) images in one request")
    except ValueError as e:  # a malformed multipart body
        raise ApiError(400, f"the multipart body cannot be read: {e}") from None
    except LineTooLong:  # aiohttp's own error (its message would quote the whole line)
        raise ApiError(400, "the multipart body cannot be read: a line of it is over the parser's limit "
                            "(no boundary where one was due, or a part header over 8 KB)") from None
    if not uploads:
        raise ApiError(400, "no `file` field in the multipart body")
    return uploads


def _transfer_decoded(part: BodyPartReader, data: bytes) -> bytes:
    """A part as sent with `Content-Transfer-Encoding` base64 or quoted-printable (RFC 7578
    deprecates it, some clients still do it), decoded; both only shrink it. (aiohttp's
    BodyPartReader.decode would also undo a part's Content-Encoding: a gzip bomb past the
    upload limit.) Lax base64 (stray characters skipped) gives what the decoder then judges."""
    encoding = part.headers.get("Content-Transfer-Encoding", "binary").strip().lower()
    try:
        if encoding == "base64":
            return base64.b64decode(data, validate=False)
        if encoding == "quoted-printable":
            return binascii.a2b_qp(data)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"a part sent as {encoding} cannot be decoded: {e}") from None
    if encoding not in ("binary", "8bit", "7bit"):
        raise ApiError(400, f"Content-Transfer-Encoding {encoding!r} is not supported: send the part as "
                            "binary (or base64, quoted-printable)")
    return data


def _untar(body: bytes, limit: int, max_bytes: int) -> list[Upload]:
    """Every file of a tar, in order (WebDataset: one image per member); a link is read as the
    member it points to (a dangling one as empty: its entry says it is not an image). What is
    read may come to at most `max_bytes`: links to one large member would multiply it."""
    try:
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:") as tar:
            every = tar.getmembers()
            _check_whole(body, every)
            members = [m for m in every if m.isfile() or m.issym() or m.islnk()]
            if len(members) > limit:
                raise ApiError(413, f"the tar holds {len(members)} files; predict_max_images is {limit}")
            uploads, total = [], 0
            for m in members:
                uploads.append(Upload(m.name, _member(tar, m)))
                total += len(uploads[-1].data)
                if total > max_bytes:
                    raise ApiError(413, f"the tar's files come to over max_upload_mb ({max_bytes} bytes) "
                                        "once its links are followed")
    except tarfile.TarError as e:
        if "unexpected end" in str(e):
            raise ApiError(400, f"the tar is cut short ({len(body)} bytes): send the whole archive") from None
        raise ApiError(400, f"the body is not a readable tar: {e}") from None
    if not uploads:
        raise ApiError(400, "the tar holds no files")
    return uploads


def _member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    try:
        file = tar.extractfile(member)
    except KeyError:  # a link to no member of the archive
        return b""
    return file.read() if file is not None else b""


def _check_whole(body: bytes, members: list[tarfile.TarInfo]) -> None:
    """tarfile stops quietly at a header cut short or damaged after the first member, as if
    the archive ended there: what follows the last member it read must be the end-of-archive
    zeros, else the tar was cut short (an upload that broke off) or is damaged."""
    end = 0
    if members:
        last = members[-1]
        end = last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    if end > len(body) or body[end:].strip(b"\0"):
        after = f" after {members[-1].name!r}" if members else ""
        raise ApiError(400, f"the tar is cut short or damaged{after} (at byte {min(end, len(body))} of "
                            f"{len(body)}): send the whole archive")


async def _decode(
    d: Daemon, mid: str, uploads: list[Upload], first: int = 0
) -> tuple[list[Frame | None], dict[int, ApiError]]:
    """One frame per decodable upload; the others' errors, by index (from `first`)."""
    loop = asyncio.get_running_loop()
    max_pixels, target = d.settings.decode.max_pixels, d.decode_target(mid)
    decoded = await asyncio.gather(*(
        loop.run_in_executor(d.decode_pool, decode_image, u.data, max_pixels, target) for u in uploads
    ), return_exceptions=True)
    frames: list[Frame | None] = []
    errors: dict[int, ApiError] = {}
    ts = now_ms()
    for i, (upload, result) in enumerate(zip(uploads, decoded), first):
        if isinstance(result, FrameError):
            errors[i] = ApiError(FRAME_STATUS.get(result.reason, 422), str(result), result.reason)
            frames.append(None)
        elif isinstance(result, BaseException):
            raise result
        else:
            image, orig = result
            frames.append(Frame("predict", upload.name, str(i), {}, ts, image=image, orig_size=orig))
    return frames, errors


async def _infer(
    d: Daemon, entry: Entry, frames: list[Frame | None], prompt: str | None
) -> dict[int, Outcome]:
    """Each decoded frame's outcome, by its index in the request."""
    assert d.adhoc is not None
    todo = {int(f.entry_id): f for f in frames if f is not None}
    if not todo:
        return {}
    control = d.settings.control
    try:
        outcomes = await d.adhoc.submit(list(todo.values()), entry.id, Prompt(prompt or "", 1), "predict",
                                        (control.predict_batch_size, control.predict_batch_timeout_ms))
    except InferenceTimeout as e:
        raise ApiError(504, str(e), "timeout") from None
    except ShuttingDown as e:
        raise ApiError(503, str(e), "unavailable") from None
    return dict(zip(todo, outcomes))


async def _answer(d: Daemon, entry: Entry, published: Published, fmt: str) -> web.Response:
    fields = published.fields
    headers = {"X-Model": entry.id, "X-Task": entry.task}
    if fmt == "png":
        payload = fields.get("depth", fields.get("mask"))
        if payload is None:
            raise ApiError(422, f"format=png: {entry.id} ({entry.task}) gives no image; use json",
                           "bad_format")
        if "depth" in fields:
            result = json.loads(fields["result"])
            headers.update({"X-Depth-Min": str(result.get("min")), "X-Depth-Max": str(result.get("max"))})
        return web.Response(body=payload, content_type="image/png", headers=headers)
    if fmt == "packbits":  # decoding the masks' RLE is work for the pool, not the event loop
        body = await asyncio.get_running_loop().run_in_executor(d.decode_pool, _packbits, entry, fields)
        return web.Response(body=body, content_type="application/octet-stream", headers=headers)
    return web.Response(body=fields["result"], content_type="application/json", headers=headers)


def _packbits(entry: Entry, fields: dict[str, Any]) -> bytes:
    result = json.loads(fields["result"])
    if "masks" not in result:
        raise ApiError(422, f"format=packbits: {entry.id} ({entry.task}) gives no masks; use json",
                       "bad_format")
    union = np.zeros((result["height"], result["width"]), dtype=bool)
    for m in result["masks"]:
        if "rle" in m:
            union |= masks.rle_decode(m["rle"])
    return masks.packbits_frame(union)


async def _batch_answer(d: Daemon, entry: Entry, uploads: list[Upload], outcomes: dict[int, Outcome],
                        errors: dict[int, ApiError], fmt: str) -> web.Response:
    headers = {"X-Batch-Size": str(len(uploads)), "X-Model": entry.id, "X-Task": entry.task}
    if fmt == "png":
        raise ApiError(422, "format=png answers one image; a batch is answered as json or packbits",
                       "bad_format")
    if fmt == "packbits":
        blocks = await asyncio.get_running_loop().run_in_executor(
            d.decode_pool, _packbits_batch, entry, len(uploads), outcomes, errors)
        return web.Response(body=blocks, content_type="application/octet-stream", headers=headers)
    items = []
    for i, upload in enumerate(uploads):
        if i in errors:
            e = errors[i]
            failed = PredictError(code=e.code or "error", message=e.message)
            items.append(BatchItem(name=upload.name, error=failed))
            continue
        fields = outcomes[i].fields  # type: ignore[union-attr]
        items.append(BatchItem(name=upload.name, result=json.loads(fields["result"]),
                               mask=_b64(fields.get("mask")), depth=_b64(fields.get("depth"))))
    body = BatchResult(model=entry.id, task=entry.task, results=items)
    return web.json_response(body.model_dump(mode="json", exclude_none=True), headers=headers)


def _packbits_batch(
    entry: Entry, count: int, outcomes: dict[int, Outcome], errors: dict[int, ApiError]
) -> bytes:
    """Each image's block after its big-endian int32 length; an image that failed has a
    negative length instead, followed by that many bytes of its error sentence (UTF-8)."""
    parts = []
    for i in range(count):
        if i in errors:
            message = f"{errors[i].code}: {errors[i].message}".encode()
            parts.append(struct.pack(">i", -len(message)) + message)
            continue
        blob = _packbits(entry, outcomes[i].fields)  # type: ignore[union-attr]
        parts.append(struct.pack(">i", len(blob)) + blob)
    return b"".join(parts)


def _b64(payload: str | bytes | None) -> str | None:
    if payload is None:
        return None
    return base64.b64encode(payload.encode() if isinstance(payload, str) else payload).decode()
