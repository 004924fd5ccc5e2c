"""A job's summaries: written once the job has read its whole source (the whole video), and,
with `every_s`, every so often while it runs (what came since the last one: a live source's
last minutes). The lines come from the job's results stream, not from memory, so a job resumed
by another daemon summarises everything, and the text model runs through the daemon's batcher
and device workers like any frame (jobs/summary.py does the windowing).

Each summary is written in one step fenced by the job's lease (store.SUMMARY): an entry in the
results stream with `task = "summary"`, and the job's `summary` field. The final summary is
written once, also when a job is resumed after it.

Every call goes through the device workers, bounded by the text model's timeout (its entry's
`timeout_s`, else at least 600 s: a window takes minutes on a CPU); the text model's
`window_tokens` bounds how long one call takes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis

from sightstream import log
from sightstream.errors import ModelError
from sightstream.frames import DeadLettered, Frame, Published, now_ms
from sightstream.jobs.run import JobStopped, fenced
from sightstream.jobs.store import Job, JobStore
from sightstream.jobs.summary import (
    Line,
    Summary,
    SummaryFailed,
    describe,
    instruction_for,
    room_of,
    summarize,
)
from sightstream.models.adapters.hf_text import TextBudget
from sightstream.prompts import Prompt
from sightstream.stages.adhoc import AdhocBatcher, ShuttingDown
from sightstream.stages.worker import InferenceTimeout

_log = log.get(__name__)
PAGE = 1000  # results read per XRANGE
# A level's windows share model calls, a few per call: a call of 8 long windows could outlast
# the text model's timeout on a CPU.
BATCHING = (4, 10.0)
# A live HLS source's summaries, when the job set neither every_s nor an end (max_seconds,
# max_frames): such a job ends only when cancelled, and a cancelled job gets no final summary.
LIVE_EVERY_S = 300.0


def text_budget(create: Callable[[str], Any], model: str, instruction: str) -> TextBudget:
    """A text model's budget for this instruction, its weights not loaded (blocking: files).
    Raises ModelError for a model that does not write text, or whose tokenizer or config
    cannot be read."""
    adapter = create(model)
    if getattr(adapter, "task", "") != "generate" or not callable(getattr(adapter, "budget", None)):
        raise ModelError(f"{model} does not write text (its task is {getattr(adapter, 'task', '?')}): "
                         "a summary needs a text generation model (task = \"generate\")")
    try:
        budget: TextBudget = adapter.budget(instruction)
    except (ValueError, KeyError, OSError) as e:
        raise ModelError(f"{model}: its tokenizer or config cannot be read: {e}") from None
    return budget


def check_summarizer(create: Callable[[str], Any], model: str, instruction: str) -> None:
    """At submission (blocking: files): the text model can write summaries with this
    instruction. Raises ModelError or SummaryFailed with the reason."""
    room_of(text_budget(create, model, instruction))


def page_lines(page: list[Any]) -> list[tuple[Line, bool]]:
    """The results of one XRANGE page as lines, each with whether its time is a video's (CPU
    work: run in a thread). Summaries and results that say nothing usable are left out."""
    out = []
    for _, fields in page:
        if fields.get(b"task") == b"summary":
            continue
        try:
            text = describe(json.loads(fields[b"result"]))
        except (KeyError, ValueError, AttributeError):
            continue  # not a result entry: nothing to say
        if text is None:
            continue
        if b"pts_ms" in fields:
            out.append((Line(int(fields[b"pts_ms"]) / 1000, text), True))
        else:
            out.append((Line(int(fields.get(b"ts", b"0")) / 1000, text), False))
    return out


class JobSummaries:
    def __init__(self, job: Job, store: JobStore, token: str, client: Redis, adhoc: AdhocBatcher,
                 create: Callable[[str], Any], maxlen: int) -> None:
        assert job.spec.summarize is not None
        self.job = job
        self._store = store
        self._token = token
        self._client = client
        self._adhoc = adhoc
        self._create = create
        self._ended = False  # the job's run ended: no periodic summary after it
        self._maxlen = maxlen
        spec = job.spec.summarize
        self.model = str(spec["model"])
        self.instruction = instruction_for(str(spec.get("prompt") or ""), job.spec.prompt or "")
        self.every_s = float(spec["every_s"]) if spec.get("every_s") else None
        self._budget: TextBudget | None = None

    async def periodic(self) -> None:
        """Every `every_s`: a summary of the results since the last one, if any came. A failure
        is logged and the next period tries again (the final summary still counts); a lost
        lease or a cancel ends the loop (the job stops anyway)."""
        assert self.every_s
        while True:
            await asyncio.sleep(self.every_s)
            if self._ended:
                return
            try:
                await self.write(final=False)
            except JobStopped:
                return
            except Exception as e:  # noqa: BLE001 - Redis down, a model failure: next period
                _log.warning("summary_failed", job=self.job.id, error=str(e) or repr(e))

    async def once_live(self, is_live: Callable[[], bool], poll_s: float = 1.0) -> None:
        """Periodic summaries every LIVE_EVERY_S from when the source turns out to be live;
        nothing for a video that ends (the task is cancelled when the job ends)."""
        while not is_live():
            await asyncio.sleep(poll_s)
            if self._ended:
                return
        self.every_s = LIVE_EVERY_S
        _log.info("summaries_every_default", job=self.job.id, every_s=self.every_s,
                  why="the source is live and the job set neither summarize.every_s nor an end")
        await self.periodic()

    def end(self) -> None:
        """The job's run ended: no more periodic summaries. The caller cancels the task too; this
        ends its loop even if a cancel is lost inside a Redis or model call."""
        self._ended = True

    async def write(self, final: bool) -> dict[str, Any] | None:
        """Summarise and write; the summary written, or None (nothing new, or written before).
        Raises SummaryFailed and JobStopped (the lease is lost, or the job cancelled)."""
        if final and self.job.summary_final:
            return None  # written before this daemon resumed the job
        after = None if final else (self.job.summary_upto or None)
        lines, upto, video = await self._lines(after)
        if not lines and not final:
            return None
        if lines:
            try:
                if self._budget is None:
                    self._budget = await asyncio.to_thread(text_budget, self._create, self.model,
                                                           self.instruction)
            except ModelError as e:
                raise SummaryFailed(str(e)) from None
            summary = await summarize(lines, self._budget, self._generate, video)
        else:  # a quiet camera, or every frame dead-lettered: nothing to ask the text model
            summary = Summary("", None, None, 0, 0, 0)
        summary.final, summary.model = final, self.model
        body = summary.as_dict()
        fields = {"source": self.job.spec.shown, "job_id": self.job.id, "ts": str(now_ms()),
                  "model": self.model, "task": "summary", "result": json.dumps(body, separators=(",", ":"))}
        if fenced(await self._store.write_summary(self.job, self._token, final, upto, body, self._maxlen,
                                                  fields)) == 0:
            return None
        self.job.summary, self.job.summary_upto = body, upto
        self.job.summary_final = self.job.summary_final or final
        _log.info("summary_written", job=self.job.id, final=final, lines=summary.lines,
                  windows=summary.windows, levels=summary.levels)
        return body

    async def _lines(self, after: str | None) -> tuple[list[Line], str, bool]:
        """The results after `after` as lines (in the stream's order), the last entry ID read,
        and whether their times are a video's (else a stream's capture times)."""
        lines: list[Line] = []
        start, upto, video = f"({after}" if after else "-", after or "", False
        while True:
            page: Any = await self._client.xrange(self.job.results_stream, start, "+", count=PAGE)
            if page:
                upto = page[-1][0].decode()
            for line, of_video in await asyncio.to_thread(page_lines, page):
                lines.append(line)
                video = video or of_video
            if len(page) < PAGE:
                return lines, upto, video
            start = f"({upto}"

    async def _generate(self, texts: list[str]) -> list[str]:
        """The text model's answer to each text, through the batcher and device workers."""
        frames = [Frame("summaries", self.job.spec.shown, f"summary-{i}", {}, now_ms(), text=text)
                  for i, text in enumerate(texts)]
        try:
            outcomes = await self._adhoc.submit(frames, self.model, Prompt(self.instruction, 0), "summaries",
                                                BATCHING)
        except InferenceTimeout as e:
            raise SummaryFailed(str(e)) from None
        except ShuttingDown as e:
            raise JobStopped(str(e)) from None
        answers = []
        for outcome in outcomes:
            if isinstance(outcome, DeadLettered):
                raise SummaryFailed(f"{self.model}: {outcome.error}")
            if not isinstance(outcome, Published):
                raise SummaryFailed(f"{self.model} gave no answer")
            answers.append(str(json.loads(outcome.fields["result"])["text"]))
        return answers
