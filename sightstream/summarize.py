"""`sightstream summarize VIDEO`: a running daemon describes the video frame by frame with one
model and writes its summary with a text model: a job (POST /jobs with `summarize`), followed
with a progress bar until it ends, then the summary printed. A live source (a camera, live
HLS) gets a summary every `--every` seconds, each printed as it is written, until
`--max-seconds` or Ctrl-C. Ctrl-C cancels the job, also during its submission (an
Idempotency-Key finds it)."""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sightstream.control_client import ControlError, Unanswered, call
from sightstream.errors import SightstreamError

POLL_S = 0.5
POLL_TRIES = 10  # polls in a row that may fail (a daemon restarting) before giving up
URL_SCHEMES = ("http://", "https://", "file://", "redis://", "rtsp://", "rtsps://")


def source_url(video: str) -> str:
    """A URL as it is; a local path as a file:// URL (the daemon reads it itself, so it must be
    on the daemon's host, under its jobs.allowed_paths)."""
    if video.startswith(URL_SCHEMES):
        return video
    return Path(video).absolute().as_uri()  # percent-encoded: a '#' or '%' in a name stays a name


def summarize(base: str, token: str, video: str, model: str, summary_model: str, *, prompt: str = "",
              summary_prompt: str = "", fps: float = 1.0, max_frames: int | None = None,
              max_seconds: float | None = None, every_s: float | None = None,
              progress: bool = True, as_json: bool = False, emit: Callable[[str], None] = print) -> int:
    body: dict[str, Any] = {"source": source_url(video), "model": model, "fps": fps, "prompt": prompt,
                            "summarize": {"model": summary_model, "prompt": summary_prompt}}
    if max_frames:
        body["max_frames"] = max_frames
    if max_seconds:
        body["max_seconds"] = max_seconds
    if every_s:
        body["summarize"]["every_s"] = every_s
    # The same key on a retry: a submission whose answer was lost (Ctrl-C, a dropped
    # connection) is found again instead of made twice.
    submission = {"Idempotency-Key": f"sightstream-summarize-{uuid.uuid4()}"}
    job_id = None
    try:
        job_id = _submit(base, token, body, submission)
        job = _follow(base, token, job_id, progress, lambda s: emit(_periodic(s, as_json)))
    except KeyboardInterrupt:
        _cancel(base, token, job_id, body, submission)
        raise
    if job["status"] != "completed":
        raise SightstreamError(f"job {job_id} {job['status']}: {job['error'] or 'no reason given'}")
    summary = job["summary"] or {}
    if not summary.get("lines") and not as_json:
        counts = job.get("counts") or {}
        print(f"sightstream: nothing to summarise: none of job {job_id}'s results says anything "
              f"({counts.get('processed', 0)} processed, {counts.get('dead_lettered', 0)} dead-lettered)",
              file=sys.stderr)
    emit(json.dumps(job) if as_json else summary.get("text", ""))  # JSON: one line, after any summaries
    return 0


def _submit(base: str, token: str, body: dict[str, Any], submission: dict[str, str]) -> str:
    failures = 0
    while True:
        try:
            return str(call(base, "/jobs", token, "POST", body, submission)["job_id"])
        except ControlError as e:
            if "allowed_paths" in str(e):
                raise SightstreamError(f"{e}. The daemon opens the file itself: put it under its "
                                       "jobs.allowed_paths, or give an http(s):// URL") from None
            raise
        except Unanswered as e:  # cut off: it may have been made, and the key finds it again
            failures += 1
            if not e.maybe_arrived or failures >= POLL_TRIES:
                raise
            print(f"sightstream: {e}; retrying", file=sys.stderr)
            time.sleep(POLL_S * failures)


def _cancel(base: str, token: str, job_id: str | None, body: dict[str, Any],
            submission: dict[str, str]) -> None:
    """Ctrl-C: cancel the job, also one whose submission was under way (its key finds it, or
    makes it to be cancelled at once: a job left running by a client that gave up is worse)."""
    try:
        if job_id is None:
            job_id = str(call(base, "/jobs", token, "POST", body, submission)["job_id"])
        call(base, f"/jobs/{job_id}", token, "DELETE")
    except SightstreamError:
        pass  # it ended meanwhile, or the daemon is gone: nothing to cancel


def _periodic(summary: dict[str, Any], as_json: bool) -> str:
    """A summary written while the job runs, as printed: with the times it covers."""
    if as_json:
        return json.dumps(summary)
    return f"[{_clock(summary.get('from_s'))}-{_clock(summary.get('to_s'))}] {summary.get('text', '')}"


def _clock(seconds: float | None) -> str:
    """Into the video, or a stream's UTC time of day (its times are seconds since the epoch)."""
    from sightstream.jobs.summary import clock

    return "?" if seconds is None else clock(seconds, video=seconds < 86_400 * 365)


class _Summaries:
    """The summaries a job writes while it runs, each once and in order. The job's `summary`
    field holds the latest, written with its count in one step: one new since the last poll is
    that one; when several came between polls (a poll failed, a slow one), they are read from
    the job's results stream."""

    PAGE = 1000

    def __init__(self, base: str, token: str, job_id: str) -> None:
        self.base, self.token, self.job_id = base, token, job_id
        self.count = 0  # the job's summaries count last seen
        self.after = ""  # the last results entry read
        self.shown: set[Any] = set()  # created_at of those returned

    def new(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        """Those written since the last call (not the final one: it is printed at the end).
        Raises SightstreamError, having taken nothing (the next call tries again)."""
        count = int(job["counts"].get("summaries", 0))
        if count <= self.count:
            return []
        latest = job.get("summary")
        found = [latest] if count == self.count + 1 and latest else self._read()
        self.count = count
        fresh = [s for s in found if not s.get("final") and s.get("created_at") not in self.shown]
        self.shown.update(s.get("created_at") for s in fresh)
        return fresh

    def _read(self) -> list[dict[str, Any]]:
        """Every summary in the results stream after the last one read."""
        found: list[dict[str, Any]] = []
        after = self.after
        while True:
            query = f"count={self.PAGE}" + (f"&after={after}" if after else "")
            page = call(self.base, f"/jobs/{self.job_id}/results?{query}", self.token)
            for entry in page["results"]:
                after = entry["id"]
                if entry["fields"].get("task") == "summary":
                    found.append(entry["fields"]["result"])
            if len(page["results"]) < self.PAGE:
                self.after = after
                return found


def _follow(base: str, token: str, job_id: str, progress: bool,
            periodic: Callable[[dict[str, Any]], None] = lambda s: None) -> dict[str, Any]:
    """Poll the job until it ends, showing how far it got (tqdm, on stderr); each summary
    written while it runs goes to `periodic`, once."""
    from tqdm import tqdm

    bar = tqdm(total=100, unit="%", desc=f"job {job_id}", file=sys.stderr, disable=not progress,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")
    failures = 0
    summaries = _Summaries(base, token, job_id)
    try:
        while True:
            try:
                job = call(base, f"/jobs/{job_id}", token)
                fresh = summaries.new(job)
                failures = 0
            except SightstreamError as e:
                failures += 1
                if failures >= POLL_TRIES:
                    raise SightstreamError(f"{e}; job {job_id} goes on (GET /jobs/{job_id})") from None
                time.sleep(POLL_S * failures)
                continue
            for summary in fresh:
                bar.clear()
                periodic(summary)
            fraction = job["progress"].get("fraction")
            position = job["progress"].get("position_s")
            done = job["status"] in ("completed", "failed", "cancelled")
            bar.n = 100 if done and job["status"] == "completed" else round(100 * (fraction or 0))
            reading_done = fraction is not None and fraction >= 0.99
            stage = "summarising" if job["status"] == "running" and reading_done else job["status"]
            # a live source has no length: how far it got is its position
            at = f", at {_clock(position)}" if fraction is None and position is not None and not done else ""
            bar.set_postfix_str(f"{job['counts']['processed']} frames{at}, {stage}", refresh=False)
            bar.refresh()
            if done:
                return job
            time.sleep(POLL_S)
    finally:
        bar.close()
